"""One optax update, for the training loops of the benchmarks and the tour."""

from __future__ import annotations

from typing import Any

import jax
import optax


def optimizer_step(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
  """`tx.update` then `optax.apply_updates`: the new `(params, opt_state)`.

  Run under JAX's standard dtype promotion: optax mixes its int32 step count
  with Python floats implicitly (Adam's bias correction, the schedules),
  which ``jax_numpy_dtype_promotion="strict"`` refuses. Only the optimizer is
  exempt; the model's forward and backward keep the caller's settings.
  """
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
