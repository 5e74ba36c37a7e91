"""Interoperability: PyTorch module state to `jaxnorm.linen` variables and back.

`jaxnorm.interop` is imported on demand (``import jaxnorm.interop`` or the
attribute ``jaxnorm.interop``), and PyTorch only inside its functions, so
jaxnorm never requires torch.

* `linen_from_torch`: the equivalent `jaxnorm.linen` (or `flax.linen`) module
  of a torch module; `linen_kwargs_from_torch`: its class and constructor
  arguments.
* `variables_from_torch`: a torch module's (or model's) state as linen
  variables ``{'params': ..., 'batch_stats': ...}``.
* `torch_state_dict`: linen variables as a `state_dict` for a torch module
  or model.
"""

from jaxnorm.interop._torch import linen_from_torch, linen_kwargs_from_torch, torch_state_dict, variables_from_torch

__all__ = [
    "linen_from_torch",
    "linen_kwargs_from_torch",
    "torch_state_dict",
    "variables_from_torch",
]
