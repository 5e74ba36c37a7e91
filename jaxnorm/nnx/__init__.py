"""Flax nnx modules: the jaxnorm family for `flax.nnx`, drop-ins where flax.nnx has the class.

Parameters are `nnx.Param` and running statistics `nnx.BatchStat`, under
flax.nnx's names and shapes (``scale``/``bias`` and ``mean``/``var`` of shape
``(num_features,)``); ``model.train()``/``model.eval()`` and ``nnx.view``
switch `use_running_average`. Every module calls jaxnorm's functional core
and works under `nnx.jit`, `nnx.vmap` (an ensemble with mapped state, or a
shared module with `axis_name`) and `nnx.scan`.
"""

from jaxnorm.nnx._adaln_zero import AdaLNZero
from jaxnorm.nnx._batch_norm import ActivatedBatchNorm, BatchNorm
from jaxnorm.nnx._batch_renorm import BatchRenorm
from jaxnorm.nnx._dyt import DyT
from jaxnorm.nnx._filter_response_norm import FilterResponseNorm
from jaxnorm.nnx._ghost_batch_norm import GhostBatchNorm
from jaxnorm.nnx._group_norm import GroupNorm, InstanceNorm
from jaxnorm.nnx._layer_norm import LayerNorm, RMSNorm
from jaxnorm.nnx._local_response_norm import LocalResponseNorm
from jaxnorm.nnx._spectral_norm import SpectralNorm
from jaxnorm.nnx._weight_norm import MeanOnlyBatchNorm, WeightNorm

__all__ = [
    "AdaLNZero",
    "ActivatedBatchNorm",
    "BatchNorm",
    "BatchRenorm",
    "DyT",
    "FilterResponseNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LocalResponseNorm",
    "MeanOnlyBatchNorm",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
]
