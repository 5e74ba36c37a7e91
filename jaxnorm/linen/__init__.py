"""Flax linen modules: drop-in replacements for `flax.linen`'s normalization layers.

Running statistics live in the ``batch_stats`` collection under flax's names,
so a checkpoint written with `flax.linen` loads into these modules unchanged.
"""

from jaxnorm.linen._adaln_zero import AdaLNZero
from jaxnorm.linen._batch_norm import ActivatedBatchNorm, BatchNorm
from jaxnorm.linen._batch_renorm import BatchRenorm
from jaxnorm.linen._dyt import DyT
from jaxnorm.linen._filter_response_norm import FilterResponseNorm
from jaxnorm.linen._fold import fold_batch_norm
from jaxnorm.linen._frozen_batch_norm import FrozenBatchNorm
from jaxnorm.linen._ghost_batch_norm import GhostBatchNorm
from jaxnorm.linen._group_norm import GroupNorm, InstanceNorm
from jaxnorm.linen._layer_norm import LayerNorm, RMSNorm
from jaxnorm.linen._local_response_norm import LocalResponseNorm
from jaxnorm.linen._precise_batch_stats import precise_batch_stats
from jaxnorm.linen._running_stats import ImmutableBatchStatsError, MissingBatchStatsError
from jaxnorm.linen._spectral_norm import SpectralNorm
from jaxnorm.linen._weight_norm import MeanOnlyBatchNorm, WeightNorm

__all__ = [
    "AdaLNZero",
    "ActivatedBatchNorm",
    "BatchNorm",
    "BatchRenorm",
    "DyT",
    "FilterResponseNorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "ImmutableBatchStatsError",
    "InstanceNorm",
    "LayerNorm",
    "LocalResponseNorm",
    "MeanOnlyBatchNorm",
    "MissingBatchStatsError",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "fold_batch_norm",
    "precise_batch_stats",
]
