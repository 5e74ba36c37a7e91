"""Analysis tools built on jaxnorm's public API: measurements behind the notebooks.

`invariance_table` measures Table 1 of Ba, Kiros & Hinton (2016): how much
each transformation of the weights or the data changes the output of a layer
normalized by batch, weight, layer or RMS normalization. Santurkar et al.
(2018): `inject_noise`/`NoiseInjection` (noisy batch norm),
`internal_covariate_shift` and `landscape_along_gradient`. Kohler et al.
(2018): `batch_norm_effective_weights`. Ioffe & Szegedy (2015): the batch-norm
backward by hand, `batch_norm_backward_steps`, checked node by node against
`batch_norm_backward_autodiff`; `variance_cancellation` of E[x^2] - E[x]^2.
`bench_records` flattens the report of `jaxnorm bench`. This package only
uses `jaxnorm`'s public names; `import jaxnorm` does not import it.
"""

from jaxnorm.analysis._invariance import (
    METHODS,
    PAPER_TABLE,
    TRANSFORMATIONS,
    invariance_table,
    normalized_output,
    transform,
)
from jaxnorm.analysis._covariate_shift import CovariateShift, internal_covariate_shift, layer_assignment
from jaxnorm.analysis._landscape import DEFAULT_MULTIPLIERS, LandscapeProbe, landscape_along_gradient
from jaxnorm.analysis._length_direction import batch_norm_effective_weights
from jaxnorm.analysis._noise_injection import PAPER_NOISE, Noise, NoiseInjection, inject_noise, sample_noise
from jaxnorm.analysis._backprop import (
    SEED_TYPOS,
    BatchNormBackward,
    batch_norm_backward_autodiff,
    batch_norm_backward_steps,
)
from jaxnorm.analysis._bench_report import bench_records, load_bench_report
from jaxnorm.analysis._cancellation import naive_variance, variance_cancellation

__all__ = [
    "METHODS",
    "PAPER_TABLE",
    "TRANSFORMATIONS",
    "invariance_table",
    "normalized_output",
    "transform",
    # Santurkar et al. 2018 (noisy BN, internal covariate shift, landscape) and Kohler et al. 2018.
    "CovariateShift",
    "DEFAULT_MULTIPLIERS",
    "LandscapeProbe",
    "Noise",
    "NoiseInjection",
    "PAPER_NOISE",
    "batch_norm_effective_weights",
    "inject_noise",
    "internal_covariate_shift",
    "landscape_along_gradient",
    "layer_assignment",
    "sample_noise",
    # The batch-norm backward by hand, variance cancellation, the benchmark's report.
    "BatchNormBackward",
    "SEED_TYPOS",
    "batch_norm_backward_autodiff",
    "batch_norm_backward_steps",
    "bench_records",
    "load_bench_report",
    "naive_variance",
    "variance_cancellation",
]
