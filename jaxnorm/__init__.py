"""jaxnorm: normalization layers for JAX and Flax with hand-derived VJPs and stable statistics.

The functional API lives at the top level. Flax modules live in
`jaxnorm.linen` and `jaxnorm.nnx`, and analysis tools in `jaxnorm.analysis`;
they are imported on demand, so that the functional core never needs Flax.
The command line lives in `jaxnorm.cli` (`python -m jaxnorm`).

Every name is imported on first use (PEP 562): `python -m jaxnorm --help` runs
this file before the command line's, and must answer without loading JAX
(seconds on a small machine). `from jaxnorm import layer_norm` and
`jaxnorm.layer_norm` work as with eager imports.
"""

import importlib as _importlib
import importlib.util as _importlib_util
import typing as _typing

if _typing.TYPE_CHECKING:  # the eager imports, for type checkers and IDEs
  from jaxnorm._batch_norm import activated_batch_norm, batch_norm
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


# Public name -> the private module that defines it.
_SOURCES = {
    "activated_batch_norm": "_batch_norm",
    "batch_norm": "_batch_norm",
    "batch_renorm": "_batch_renorm",
    "batch_renorm_schedule": "_batch_renorm",
    "dyt": "_dyt",
    "filter_response_norm": "_filter_response_norm",
    "ghost_batch_norm": "_ghost_batch_norm",
    "group_norm": "_group_norm",
    "instance_norm": "_group_norm",
    "layer_norm": "_layer_norm",
    "rms_norm": "_layer_norm",
    "local_response_norm": "_local_response_norm",
    "moments": "_moments",
    "normalize": "_normalize",
    "spectral_norm": "_spectral_norm",
    "Standardizer": "_standardizer",
    "weight_norm": "_weight_norm",
}
__all__ = list(_SOURCES)


def __getattr__(name: str):
  if name in _SOURCES:
    value = getattr(_importlib.import_module(f"jaxnorm.{_SOURCES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value
  # Submodules: the Flax layers, the analysis tools and the CLI are users of
  # this package, never a part of its import; private modules (`jaxnorm._moments`)
  # stay reachable as attributes, as they were with eager imports.
  if not name.startswith("__") and _importlib_util.find_spec(f"jaxnorm.{name}") is not None:
    return _importlib.import_module(f"jaxnorm.{name}")
  raise AttributeError(f"module 'jaxnorm' has no attribute {name!r}")


# The subpackages users import: Flax modules, analysis tools, interop, the command line.
_SUBPACKAGES = ("analysis", "cli", "interop", "linen", "nnx")


def __dir__() -> list[str]:
  """The public names: the functional API, the subpackages and the version (no private helpers)."""
  return sorted({*__all__, *_SUBPACKAGES, "__version__"})
