"""jaxnorm: normalization layers for JAX and Flax with hand-derived VJPs and stable statistics.

The functional API lives at the top level; Flax modules live in
`jaxnorm.linen`, imported on demand so that the functional core never needs
Flax.
"""

from jaxnorm._batch_norm import batch_norm
from jaxnorm._layer_norm import layer_norm, rms_norm
from jaxnorm._moments import moments
from jaxnorm._normalize import normalize

__version__ = "0.1.0"

__all__ = ["batch_norm", "layer_norm", "moments", "normalize", "rms_norm"]


def __getattr__(name: str):
  # Imported lazily: `import jaxnorm` must not pull in Flax.
  if name == "linen":
    import importlib

    return importlib.import_module("jaxnorm.linen")
  raise AttributeError(f"module 'jaxnorm' has no attribute {name!r}")
