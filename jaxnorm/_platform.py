"""What the kernel does differently per backend: CPU-only private copies, and a per-backend choice of formula.

XLA's backends want different programs for the same math. XLA:CPU writes a
full-size value to memory whenever it has two consumers, and writing fresh
memory costs far more than reading it there; so on the CPU every full-size
term is built from *private copies* of its inputs that common-subexpression
elimination cannot merge (`private_copies`). XLA:GPU and XLA:TPU write no
such temporary, but an `optimization_barrier` would split their multi-output
fusions (and H100's single-kernel Triton normalization): there the copies
lower to nothing. Which program a function gets is decided at lowering time,
per platform, so one jaxpr serves every backend and `jax.export` with several
platforms gives each its own program (`lax.platform_dependent` does the same
for whole formulas, see `by_platform`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax import lax
from jax.experimental import jet
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

T = TypeVar("T")

_private_copies_p = jex_core.Primitive("jaxnorm_private_copies")
_private_copies_p.multiple_results = True


def private_copies(tag: int, x: jax.Array, *small: jax.Array) -> tuple[jax.Array, ...]:
  """`x` and small arrays (statistics) as values that XLA:CPU cannot merge with those of any other `tag`.

  A full-size expression such as ``x - shift``, or merely ``x.astype(float32)``
  for a bfloat16 `x`, that appears in two places is merged by XLA's
  common-subexpression elimination into one value with two consumers;
  XLA:CPU then writes it to memory (a full-size temporary). Building each
  full-size expression from its own copies keeps the expressions apart, so
  each fuses into its single consumer and recomputes its terms from `x` in
  registers. On the CPU the copies pass through one `optimization_barrier`
  together with `tag`, and the small arrays get ``tag - tag`` added, with the
  first `tag` hidden by the barrier, which keeps the barriers of different
  tags apart (a tag left unused would be dropped, and the barriers merged).
  On every other platform the copies are the values themselves: no barrier,
  no arithmetic. Values are exact and the derivative is the identity.
  """
  return tuple(_private_copies_p.bind(x, *small, tag=tag))


def _cpu_copies(x, *small, tag):
  x, *small, hidden = lax.optimization_barrier((x, *small, np.float32(tag)))
  zero = hidden - np.float32(tag)
  return (x, *(c + zero.astype(c.dtype) for c in small))


_private_copies_p.def_impl(lambda *args, tag: args)
_private_copies_p.def_abstract_eval(lambda *avals, tag: avals)
mlir.register_lowering(_private_copies_p, lambda ctx, *args, tag: list(args))
mlir.register_lowering(_private_copies_p, mlir.lower_fun(_cpu_copies, multiple_results=True), platform="cpu")


def _jvp(primals, tangents, *, tag):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  return private_copies(tag, *primals), private_copies(tag, *tangents)


def _transpose(cts, *primals, tag):
  del primals
  return private_copies(tag, *(ad.instantiate_zeros(ct) for ct in cts))


ad.primitive_jvps[_private_copies_p] = _jvp
ad.primitive_transposes[_private_copies_p] = _transpose
batching.primitive_batchers[_private_copies_p] = lambda args, dims, *, tag: (private_copies(tag, *args), dims)
# Taylor series pass through an identity unchanged (`jax.experimental.jet`).
jet.jet_rules[_private_copies_p] = lambda primals, series, *, tag: (private_copies(tag, *primals), series)


def by_platform(*args: Any, default: Callable[..., T], **per_platform: Callable[..., T]) -> T:
  """``per_platform[p](*args)`` where the program is compiled for platform `p` ("cpu", "cuda", ...), else ``default(*args)``.

  The choice is made when the program is lowered (`lax.platform_dependent`):
  a program lowered for one platform contains only its branch, and one
  exported for several (`jax.export` with `platforms=`) gives each its own.
  The branches compute the same function; they differ in the passes over
  memory each backend runs fastest. `force` overrides the choice for tests.
  """
  if _forced is not None:
    return per_platform.get(_forced, default)(*args)
  return lax.platform_dependent(*args, default=default, **per_platform)


_forced: str | None = None


@contextlib.contextmanager
def force(platform: str | None):
  """Within the block, traces `by_platform` as if compiling for `platform` (tests of a branch on this machine).

  Compiled programs are cached by their arguments, not by this setting: the
  caches are cleared on entry and exit so that the block traces afresh.
  """
  global _forced
  previous, _forced = _forced, platform
  jax.clear_caches()
  try:
    yield
  finally:
    _forced = previous
    jax.clear_caches()
