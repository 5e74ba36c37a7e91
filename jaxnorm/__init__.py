"""jaxnorm: normalization layers for JAX and Flax with hand-derived VJPs and stable statistics.

The functional API lives at the top level. Flax modules live in
`jaxnorm.linen` and `jaxnorm.nnx`, and analysis tools in `jaxnorm.analysis`;
they are imported on demand, so that the functional core never needs Flax.
"""

from jaxnorm._batch_norm import batch_norm
from jaxnorm._batch_renorm import batch_renorm, batch_renorm_schedule
from jaxnorm._dyt import dyt
from jaxnorm._filter_response_norm import filter_response_norm
from jaxnorm._ghost_batch_norm import ghost_batch_norm
from jaxnorm._group_norm import group_norm, instance_norm
from jaxnorm._layer_norm import layer_norm, rms_norm
from jaxnorm._local_response_norm import local_response_norm
from jaxnorm._moments import moments
from jaxnorm._normalize import normalize
from jaxnorm._spectral_norm import spectral_norm
from jaxnorm._standardizer import Standardizer
from jaxnorm._weight_norm import weight_norm

__version__ = "0.1.0"

__all__ = [
    "batch_norm",
    "batch_renorm",
    "batch_renorm_schedule",
    "dyt",
    "filter_response_norm",
    "ghost_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "local_response_norm",
    "moments",
    "normalize",
    "rms_norm",
    "spectral_norm",
    "Standardizer",
    "weight_norm",
]


def __getattr__(name: str):
  # Imported lazily: `import jaxnorm` must not pull in Flax, and the analysis
  # tools are users of this package, never a part of its import.
  if name in ("linen", "nnx", "analysis", "interop"):
    import importlib

    return importlib.import_module(f"jaxnorm.{name}")
  raise AttributeError(f"module 'jaxnorm' has no attribute {name!r}")
