"""Calling a wrapped nnx layer on a transformed, read-only view of its parameters (weight and spectral norm).

flax.nnx 0.12's `WeightNorm` and `SpectralNorm` write the normalized weight
into the wrapped layer's own ``Param`` before calling it, so the layer's
stored kernel *becomes* ``g v / ||v||`` (or ``w / sigma``): the next call
normalizes an already normalized weight, an optimizer updates the wrong
quantity, and a checkpoint holds the wrong one. Here the wrapped layer is
split into its graph and its Variables, and merged again into a view in
which each transformed ``Param`` is a new Variable holding the transformed
value, while every other Variable (batch statistics, RNG counters, untouched
params) is the original object, shared. The layer runs on the view, so what
it mutates (e.g. an inner BatchNorm's statistics) lands in the original,
and its parameters are never written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

# (path in the layer, the Param) -> the value the layer sees instead, or None for the Param itself.
Transform = Callable[[tuple, nnx.Param], Any]


def param_paths(layer: nnx.Module) -> list[tuple[tuple, nnx.Param]]:
  """The layer's ``Param`` Variables with their paths relative to the layer, in flax's order."""
  return list(nnx.to_flat_state(nnx.state(layer, nnx.Param)))


def view(layer: nnx.Module, transform: Transform) -> nnx.Module:
  """A view of `layer` whose ``Param`` at `path` holds ``transform(path, param)`` (None: the original)."""
  graphdef, state = nnx.split(layer)
  leaves = []
  for path, variable in nnx.to_flat_state(state):
    new = transform(path, variable) if isinstance(variable, nnx.Param) else None
    # A raw array becomes a fresh Variable of the same type and metadata in `merge`;
    # a Variable object is reused as is, so it stays shared with `layer`.
    leaves.append((path, variable if new is None else new))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def call(layer: nnx.Module, transform: Transform, *args: Any, **kwargs: Any) -> Any:
  """``layer(*args, **kwargs)`` on `view(layer, transform)`."""
  return view(layer, transform)(*args, **kwargs)
