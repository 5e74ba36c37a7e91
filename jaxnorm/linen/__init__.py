"""Flax linen modules: drop-in replacements for `flax.linen`'s normalization layers.

Running statistics live in the ``batch_stats`` collection under flax's names,
so a checkpoint written with `flax.linen` loads into these modules unchanged.
"""

from jaxnorm.linen._batch_norm import BatchNorm
from jaxnorm.linen._layer_norm import LayerNorm, RMSNorm

__all__ = ["BatchNorm", "LayerNorm", "RMSNorm"]
