r"""PyTorch <-> `jaxnorm.linen`: the state of `torch.nn` normalization modules as linen variables, and back.

PyTorch is imported inside the functions only, so jaxnorm never requires it.

Supported torch modules and their linen twins (`linen_from_torch`):

==============================================  ==================================================
torch                                           linen twin; variables
==============================================  ==================================================
``BatchNorm1d/2d/3d``                           `jaxnorm.linen.BatchNorm` (``axis=-1``); params
                                                ``scale``/``bias`` = ``weight``/``bias``;
                                                batch_stats ``mean``/``var``
                                                (/``num_batches_tracked``) = ``running_mean``/
                                                ``running_var``(/``num_batches_tracked``)
``LayerNorm``                                   `jaxnorm.linen.LayerNorm` over the trailing
                                                ``len(normalized_shape)`` axes; ``scale``/``bias``
``RMSNorm``                                     `jaxnorm.linen.RMSNorm`, the same axes; ``scale``
``GroupNorm``                                   `jaxnorm.linen.GroupNorm`; ``scale``/``bias``
``InstanceNorm1d/2d/3d``                        `jaxnorm.linen.InstanceNorm`; ``scale``/``bias``
                                                when ``affine=True``
``Linear``, ``Conv1d/2d/3d``                    `flax.linen.Dense`, `flax.linen.Conv`;
                                                ``kernel``/``bias``
the same with                                   `jaxnorm.linen.WeightNorm` around the layer;
``parametrizations.weight_norm`` on ``weight``  ``layer_instance/kernel`` = ``original1`` (`v`),
                                                ``layer_instance/kernel/scale`` = ``original0``
                                                (`g`)
the same with                                   `jaxnorm.linen.SpectralNorm` around the layer;
``parametrizations.spectral_norm``              ``layer_instance/kernel`` = ``original``;
                                                batch_stats ``layer_instance/kernel/u`` = ``_u``
                                                and ``.../sigma``
==============================================  ==================================================

Conventions, and what the conversion does about each:

* **Layout.** torch is channels-first (``NC...``), jaxnorm channels-last
  (``N...C``): the *inputs* are transposed (``np.moveaxis(x, 1, -1)``), not
  the per-channel vectors (``weight``, ``bias``, running statistics: shape
  ``(C,)`` in both). Weights of linear maps are transposed: a ``Linear``
  weight ``(out, in)`` is a Dense kernel ``(in, out)``, a ``Conv`` weight
  ``(out, in, k...)`` a Conv kernel ``(k..., in, out)``; weight norm's `g`
  ``(out, 1, ...)`` becomes ``(out,)``. LayerNorm and RMSNorm parameters keep
  torch's axis order: the twin normalizes the same trailing axes, so it must
  see them in the same order (for a LayerNorm over ``(C, H, W)`` of an image,
  feed the twin ``(N, C, H, W)`` there, or transpose its parameters yourself).
  A ``Linear`` after ``flatten`` of NCHW feature maps reads its inputs in
  ``(C, H, W)`` order, the twin in ``(H, W, C)`` order: pool first, or permute
  the kernel's rows.
* **Momentum.** torch's ``momentum`` (0.1) is the weight of the *new* batch,
  flax's (0.99) the weight of the *old* running value. With
  ``convention="torch"`` (the default here) the twin is
  ``BatchNorm(convention="torch", momentum=m)``, which updates exactly as
  torch does (``momentum=None``, the cumulative average, included); with
  ``convention="flax"`` it is ``BatchNorm(momentum=1 - m)``, a flax.linen
  compatible tree without ``num_batches_tracked``.
* **Running variance.** torch updates ``running_var`` with the *unbiased*
  batch variance :math:`\sigma_B^2 \, n/(n-1)` and jaxnorm's
  ``convention="torch"`` does the same, so the stored value is copied
  unchanged both ways and inference *and* training steps agree.
  Under ``convention="flax"`` it is copied unchanged as well: at inference
  both divide by :math:`\sqrt{\bar\sigma^2 + \epsilon}`, so the unchanged copy
  is what keeps the model's predictions identical; later training steps then
  blend in biased batch variances (a factor :math:`(n-1)/n` on each new
  batch's contribution, under 1% for more than 100 values per channel).
  Rescaling the stored value instead would need the `n` of every past batch,
  which the state does not record, and would change the predictions.
* **Epsilon** is copied (``eps`` -> ``epsilon``). ``RMSNorm(eps=None)`` means
  the machine epsilon of the input's dtype in torch; the twin gets that of the
  module's parameter dtype. Weight norm: torch adds nothing to
  :math:`\lVert v\rVert`, `WeightNorm` adds its ``epsilon=1e-12`` to
  :math:`\lVert v\rVert^2` (a relative difference of
  :math:`10^{-12}/\lVert v\rVert^2`). Spectral norm: torch divides by
  :math:`\max(\lVert a\rVert, \epsilon)`, jaxnorm by
  :math:`\sqrt{\lVert a\rVert^2 + \epsilon'}`, so the twin gets
  :math:`\epsilon' = \epsilon^2`.
* **Spectral norm's power iteration.** torch keeps `u` and `v`, and
  iterates ``u <- W v, v <- W^T u`` in training only; flax and jaxnorm keep
  `u` and iterate ``v <- W^T u, u <- W v`` on every call. `u` is copied both
  ways (torch's ``_u`` of shape ``(out,)`` is ``u[0]`` of shape
  ``(1, out)``); back in torch, ``_v`` is set to ``normalize(W^T u)``, the
  value torch's own last step leaves; ``sigma`` is ``u . W v``. The two
  estimates of the largest singular value are half a power-iteration step
  apart, so outputs agree to the convergence of the iteration (to rounding in
  a trained model, where it has converged), not exactly after one step.
* **Dtypes.** Arrays keep their dtype (float64 torch tensors become float64
  JAX arrays when ``jax_enable_x64`` is on) and the twin's `param_dtype` is
  the torch parameters' dtype; ``num_batches_tracked`` is int32 in JAX, int64
  in torch.

Not supported (a `TypeError` or `ValueError` says so): ``ConvTranspose``,
``padding_mode`` other than ``"zeros"``, ``InstanceNorm`` with
``track_running_stats=True``, parametrizations of anything but ``weight``
(or of norm layers), weight/spectral norm over a ``dim`` other than the
output features, the deprecated hook-based ``torch.nn.utils.weight_norm`` /
``spectral_norm`` (use ``torch.nn.utils.parametrizations``), and lazy modules
before their first forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxnorm import linen as jnn

CONVENTIONS = ("torch", "flax")
_WN_SCALE = "layer_instance/kernel/scale"
_SN_U = "layer_instance/kernel/u"
_SN_SIGMA = "layer_instance/kernel/sigma"

Path = str | Sequence[str]


def _torch():
  try:
    import torch  # noqa: PLC0415  (jaxnorm never requires torch)
  except ImportError as e:  # pragma: no cover - torch is installed in the test environment
    raise ImportError("jaxnorm.interop's torch functions need PyTorch: `pip install torch`.") from e
  return torch


# ---------------------------------------------------------------------------------------------------------------
# What a torch module is.


def _kind(module: Any) -> str:
  """One of 'batch_norm', 'layer_norm', 'rms_norm', 'group_norm', 'instance_norm', 'linear', 'conv'."""
  torch = _torch()
  tnn = torch.nn
  if not isinstance(module, tnn.Module):
    raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}.")
  if isinstance(module, tnn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
    raise ValueError(
        f"{type(module).__name__} is a lazy module whose parameters are not initialized yet: "
        "run one forward pass first."
    )
  kinds = [
      ((tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.BatchNorm3d), "batch_norm"),
      ((tnn.InstanceNorm1d, tnn.InstanceNorm2d, tnn.InstanceNorm3d), "instance_norm"),
      ((tnn.GroupNorm,), "group_norm"),
      ((tnn.LayerNorm,), "layer_norm"),
      ((tnn.RMSNorm,), "rms_norm"),
      ((tnn.Linear,), "linear"),
      ((tnn.Conv1d, tnn.Conv2d, tnn.Conv3d), "conv"),
  ]
  for classes, kind in kinds:
    if isinstance(module, classes):
      _check_parametrizations(module, kind)
      return kind
  raise TypeError(
      f"jaxnorm.interop does not convert {type(module).__name__}; supported: BatchNorm1d/2d/3d, "
      "InstanceNorm1d/2d/3d, GroupNorm, LayerNorm, RMSNorm, Linear and Conv1d/2d/3d (the last two also with "
      "torch.nn.utils.parametrizations.weight_norm or spectral_norm on `weight`). For a whole model, pass "
      "`names`, a mapping from its submodules' names to linen paths."
  )


def _check_parametrizations(module: Any, kind: str) -> None:
  from torch.nn.utils import parametrize  # noqa: PLC0415

  if "weight_g" in module._parameters or "weight_orig" in module._parameters:
    raise ValueError(
        f"{type(module).__name__} uses the deprecated hook-based torch.nn.utils.weight_norm/spectral_norm; "
        "jaxnorm.interop reads torch.nn.utils.parametrizations.weight_norm/spectral_norm (remove the hook "
        "and apply the parametrization)."
    )
  if not parametrize.is_parametrized(module):
    return
  names = sorted(module.parametrizations.keys())
  if kind not in ("linear", "conv") or names != ["weight"] or len(module.parametrizations.weight) != 1:
    raise ValueError(
        f"jaxnorm.interop converts a single weight_norm or spectral_norm parametrization of the `weight` of a "
        f"Linear or Conv, got {type(module).__name__} with parametrizations of {names}."
    )


def _weight_parametrization(module: Any) -> tuple[str | None, Any]:
  """(None, None), ('weight_norm', p) or ('spectral_norm', p): the parametrization of `module.weight`."""
  from torch.nn.utils import parametrize  # noqa: PLC0415

  if not parametrize.is_parametrized(module, "weight"):
    return None, None
  p = module.parametrizations.weight[0]
  name = type(p).__name__
  if name == "_WeightNorm":
    # torch stores dim=None as -1, meaning one norm over the whole tensor.
    if p.dim not in (0, -1):
      raise ValueError(
          f"weight_norm(dim={p.dim}) of {type(module).__name__}: jaxnorm.interop converts dim=0 (one norm per "
          "output feature, torch's default) and dim=None (one norm)."
      )
    return "weight_norm", p
  if name == "_SpectralNorm":
    if p.dim != 0:
      raise ValueError(
          f"spectral_norm(dim={p.dim}) of {type(module).__name__}: jaxnorm.interop converts dim=0, the output "
          "features (torch's default for Linear and Conv)."
      )
    return "spectral_norm", p
  raise ValueError(
      f"jaxnorm.interop converts weight_norm and spectral_norm parametrizations, got {name} on "
      f"{type(module).__name__}.weight."
  )


def _param_dtype(module: Any) -> Any:
  torch = _torch()
  for t in list(module.parameters()) + list(module.buffers()):
    if t.is_floating_point():
      return _jax_dtype(t.dtype)
  return _jax_dtype(torch.get_default_dtype())


def _jax_dtype(torch_dtype: Any) -> Any:
  return jnp.dtype(str(torch_dtype).removeprefix("torch."))


def _check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(
        f"`convention` must be one of {CONVENTIONS} (how the twin updates running statistics), got {convention!r}."
    )


# ---------------------------------------------------------------------------------------------------------------
# Modules.


def _layer_kwargs(module: Any, kind: str, param_dtype: Any) -> tuple[type[nn.Module], dict[str, Any]]:
  """The flax Dense or Conv computing what the torch Linear or Conv computes (channels-last)."""
  use_bias = module.bias is not None
  if kind == "linear":
    return nn.Dense, dict(features=module.out_features, use_bias=use_bias, param_dtype=param_dtype)
  if module.padding_mode != "zeros":
    raise ValueError(
        f"{type(module).__name__}(padding_mode={module.padding_mode!r}): jaxnorm.interop converts "
        "padding_mode='zeros' only."
    )
  if isinstance(module.padding, str):
    padding: Any = module.padding.upper()  # 'valid', 'same': flax pads 'SAME' like torch, the extra at the end
  else:
    padding = [(p, p) for p in module.padding]
  return nn.Conv, dict(
      features=module.out_channels,
      kernel_size=tuple(module.kernel_size),
      strides=tuple(module.stride),
      padding=padding,
      kernel_dilation=tuple(module.dilation),
      feature_group_count=module.groups,
      use_bias=use_bias,
      param_dtype=param_dtype,
  )


def linen_kwargs_from_torch(module: Any, *, convention: str = "torch") -> tuple[type[nn.Module], dict[str, Any]]:
  """The linen class and constructor arguments equivalent to a torch module (see the table above).

  ``cls(**kwargs)`` takes channels-last inputs and the variables of
  `variables_from_torch`. Mode is a call argument in linen: where torch has
  ``module.train()``/``module.eval()``, pass ``use_running_average=False/True``
  to `BatchNorm`, and ``update_stats`` to `SpectralNorm`.

  Args:
    module: a supported `torch.nn.Module`.
    convention: ``"torch"`` (running statistics updated exactly as torch,
      ``momentum`` unchanged) or ``"flax"`` (``momentum = 1 - torch_momentum``,
      flax's biased update, no ``num_batches_tracked``).

  Returns:
    ``(cls, kwargs)``.

  Example:
    >>> import torch
    >>> from jaxnorm import interop
    >>> cls, kwargs = interop.linen_kwargs_from_torch(torch.nn.BatchNorm2d(8, momentum=0.2), convention="flax")
    >>> cls.__name__, kwargs["momentum"], kwargs["epsilon"], kwargs["convention"]
    ('BatchNorm', 0.8, 1e-05, 'flax')
  """
  _check_convention(convention)
  kind = _kind(module)
  param_dtype = _param_dtype(module)
  if kind == "batch_norm":
    momentum = module.momentum
    if convention == "flax":
      if momentum is None:
        raise ValueError(
            f"{type(module).__name__}(momentum=None) is a cumulative average, which only "
            'convention="torch" reproduces.'
        )
      momentum = 1.0 - momentum
    return jnn.BatchNorm, dict(
        axis=-1,
        momentum=momentum,
        epsilon=float(module.eps),
        use_scale=module.affine,
        use_bias=module.affine,
        param_dtype=param_dtype,
        convention=convention,
        track_running_stats=module.track_running_stats,
    )
  if kind == "instance_norm":
    if module.track_running_stats:
      raise ValueError(
          f"{type(module).__name__}(track_running_stats=True): jaxnorm.linen.InstanceNorm has no running "
          "statistics; only track_running_stats=False (torch's default) converts."
      )
    return jnn.InstanceNorm, dict(
        epsilon=float(module.eps), use_scale=module.affine, use_bias=module.affine, param_dtype=param_dtype
    )
  if kind == "group_norm":
    return jnn.GroupNorm, dict(
        num_groups=module.num_groups,
        epsilon=float(module.eps),
        use_scale=module.affine,
        use_bias=module.affine,
        param_dtype=param_dtype,
    )
  if kind in ("layer_norm", "rms_norm"):
    axes = tuple(range(-len(module.normalized_shape), 0))
    kwargs = dict(
        use_scale=module.elementwise_affine, reduction_axes=axes, feature_axes=axes, param_dtype=param_dtype
    )
    if kind == "layer_norm":
      return jnn.LayerNorm, dict(
          epsilon=float(module.eps), use_bias=module.elementwise_affine and module.bias is not None, **kwargs
      )
    eps = module.eps if module.eps is not None else float(jnp.finfo(param_dtype).eps)
    return jnn.RMSNorm, dict(epsilon=float(eps), **kwargs)
  layer_cls, layer_kwargs = _layer_kwargs(module, kind, param_dtype)
  parametrization, p = _weight_parametrization(module)
  if parametrization is None:
    return layer_cls, layer_kwargs
  layer = layer_cls(**layer_kwargs)
  if parametrization == "weight_norm":
    return jnn.WeightNorm, dict(layer_instance=layer, feature_axes=-1 if p.dim == 0 else None, param_dtype=param_dtype)
  return jnn.SpectralNorm, dict(
      layer_instance=layer, n_steps=p.n_power_iterations, epsilon=float(p.eps) ** 2, param_dtype=param_dtype
  )


def linen_from_torch(module: Any, *, convention: str = "torch", **overrides: Any) -> nn.Module:
  """The linen module equivalent to a torch module: ``cls(**kwargs, **overrides)`` of `linen_kwargs_from_torch`.

  Args:
    module: a supported `torch.nn.Module` (see the module docstring).
    convention: ``"torch"`` or ``"flax"``, for `BatchNorm` (see
      `linen_kwargs_from_torch`).
    **overrides: constructor arguments to add or replace, e.g. ``name=``,
      ``dtype=``, ``axis_name=``.

  Returns:
    An unbound linen module for channels-last inputs.

  Example:
    >>> import numpy as np, torch
    >>> from jaxnorm import interop
    >>> gn = torch.nn.GroupNorm(2, 4)
    >>> twin = interop.linen_from_torch(gn)
    >>> x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)  # (N, C, L)
    >>> y = twin.apply(interop.variables_from_torch(gn), np.moveaxis(x, 1, -1))  # (N, L, C)
    >>> bool(np.allclose(np.moveaxis(np.asarray(y), -1, 1), gn(torch.tensor(x)).detach().numpy(), atol=1e-5))
    True
  """
  cls, kwargs = linen_kwargs_from_torch(module, convention=convention)
  return cls(**{**kwargs, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# torch -> linen variables.


def _array(t: Any, dtype: Any = None) -> Any:
  """A torch tensor as a JAX array of its own dtype (or `dtype`)."""
  torch = _torch()
  t = t.detach().cpu()
  name = _jax_dtype(t.dtype)
  if t.dtype == torch.bfloat16:
    t = t.float()  # numpy has no bfloat16; the round trip through float32 is exact
  # A copy: JAX on CPU may alias a numpy buffer, which here is torch's, and torch updates buffers in place.
  return jnp.array(t.numpy(), dtype if dtype is not None else name, copy=True)


def _kernel(weight: Any) -> Any:
  """torch ``(out, in, k...)`` -> flax ``(k..., in, out)``; ``(out, in)`` -> ``(in, out)``."""
  return _array(weight.permute(*range(2, weight.ndim), 1, 0))


def _expected_shapes(module: Any, kind: str) -> dict[str, tuple[int, ...]]:
  """The shape each entry of the module's state must have, from its constructor arguments."""
  if kind in ("batch_norm", "instance_norm"):
    c = (module.num_features,)
    return {"weight": c, "bias": c, "running_mean": c, "running_var": c, "num_batches_tracked": ()}
  if kind == "group_norm":
    return {"weight": (module.num_channels,), "bias": (module.num_channels,)}
  if kind in ("layer_norm", "rms_norm"):
    shape = tuple(module.normalized_shape)
    return {"weight": shape, "bias": shape}
  out = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
  if hasattr(module, "in_features"):
    weight = (out, module.in_features)
  else:
    weight = (out, module.in_channels // module.groups, *module.kernel_size)
  return {"weight": weight, "bias": (out,), "parametrizations.weight.original": weight,
          "parametrizations.weight.original1": weight, "parametrizations.weight.0._u": (out,)}


def _check_state(module: Any, kind: str) -> None:
  """Shapes and values of the module's state, checked on the way in, naming the key.

  Buffers can be replaced by assignment or ``load_state_dict(strict=False)``
  without torch checking them; converted unchecked, a wrong width or a NaN
  counter would only fail later, far from its cause, or silently corrupt the
  running statistics.
  """
  expected = _expected_shapes(module, kind)
  for key, tensor in module.state_dict().items():
    if key in expected and tuple(tensor.shape) != expected[key]:
      raise ValueError(
          f"{type(module).__name__} state {key!r} has shape {tuple(tensor.shape)}, but the module's own "
          f"arguments need {expected[key]} (e.g. a state dict of another width was loaded into it)."
      )
  if kind != "batch_norm" or not module.track_running_stats:
    return
  steps = module.num_batches_tracked
  _check_running_statistics(
      type(module).__name__ + " state",
      {"running_mean": module.running_mean.detach().double().numpy(), "running_var": module.running_var.detach().double().numpy()},
      None if steps is None else steps.detach().double().item(),
      np.iinfo(np.int32).max,
  )


def _check_running_statistics(owner: str, stats: Mapping[str, np.ndarray], steps: Any, max_steps: int) -> None:
  """Raises `ValueError` unless the running mean and variance are finite (the variance >= 0) and `steps`
  (None, or the number of batches tracked) is a non-negative integer up to `max_steps`: checked both ways,
  torch into JAX (int32) and JAX into torch (int64)."""
  for key, value in stats.items():
    value = np.asarray(value, np.float64)
    if not np.isfinite(value).all():
      raise ValueError(f"{owner} {key!r} holds NaN or inf: {value.tolist()}.")
    if key.endswith("var") and (value < 0).any():
      raise ValueError(f"{owner} {key!r} holds negative values: {value.tolist()}.")
  if steps is not None:
    value = float(np.asarray(steps, np.float64))
    if not (np.isfinite(value) and value >= 0 and value == int(value) and value <= max_steps):
      raise ValueError(
          f"{owner} 'num_batches_tracked' must be a non-negative integer count that fits in "
          f"{'int32' if max_steps == np.iinfo(np.int32).max else 'int64'}, got {np.asarray(steps).item()!r}."
      )


def _module_variables(module: Any, convention: str) -> dict[str, dict[str, Any]]:
  kind = _kind(module)
  linen_kwargs_from_torch(module, convention=convention)  # the same checks as for the twin
  _check_state(module, kind)
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  if kind in ("batch_norm", "instance_norm", "group_norm"):
    if module.affine:
      params = {"scale": _array(module.weight), "bias": _array(module.bias)}
    if kind == "batch_norm" and module.track_running_stats:
      stats = {"mean": _array(module.running_mean), "var": _array(module.running_var)}
      if convention == "torch":
        stats["num_batches_tracked"] = _array(module.num_batches_tracked, jnp.int32)
  elif kind in ("layer_norm", "rms_norm"):
    if module.elementwise_affine:
      params["scale"] = _array(module.weight)
      if getattr(module, "bias", None) is not None:
        params["bias"] = _array(module.bias)
  else:
    parametrization, p = _weight_parametrization(module)
    layer: dict[str, Any] = {}
    if parametrization is None:
      layer["kernel"] = _kernel(module.weight)
    elif parametrization == "weight_norm":
      g, v = module.parametrizations.weight.original0, module.parametrizations.weight.original1
      layer["kernel"] = _kernel(v)
      params[_WN_SCALE] = _array(g.reshape(-1) if p.dim == 0 else g.reshape(()))
    else:
      w = module.parametrizations.weight.original
      layer["kernel"] = _kernel(w)
      u, v = p._u, p._v
      sigma = u.detach() @ (w.detach().reshape(w.shape[0], -1) @ v.detach())
      stats = {_SN_U: _array(u.reshape(1, -1)), _SN_SIGMA: _array(sigma)}
    if module.bias is not None:
      layer["bias"] = _array(module.bias)
    if parametrization is None:
      params = layer
    else:
      params["layer_instance"] = layer
  return {c: tree for c, tree in (("params", params), ("batch_stats", stats)) if tree}


def _split(path: Path) -> tuple[str, ...]:
  parts = tuple(p for p in path.split("/") if p) if isinstance(path, str) else tuple(path)
  if not parts or not all(isinstance(p, str) for p in parts):
    raise ValueError(f"a linen path must be a non-empty 'a/b' string or a tuple of names, got {path!r}.")
  return parts


def _pairs(module: Any, names: Mapping[str, Path] | None) -> list[tuple[str, Any, tuple[str, ...]]]:
  """(torch name, torch submodule, linen path) for each entry of `names`; the module itself when None."""
  if names is None:
    return [("", module, ())]
  if not isinstance(names, Mapping):
    raise TypeError(f"`names` must map torch submodule names to linen paths, got {type(names).__name__}.")
  out = []
  for torch_name, path in names.items():
    try:
      sub = module.get_submodule(torch_name)
    except AttributeError:
      known = [n for n, _ in module.named_modules() if n]
      raise ValueError(f"`names`: the torch model has no submodule {torch_name!r}; it has {known}.") from None
    out.append((torch_name, sub, _split(path)))
  return out


def variables_from_torch(
    module: Any, names: Mapping[str, Path] | None = None, *, convention: str = "torch"
) -> dict[str, dict[str, Any]]:
  """The state of a torch module, or of chosen submodules of a model, as linen variables.

  Args:
    module: a supported torch module (then the variables are its twin's, at
      the top level), or any model with `names`.
    names: maps torch submodule names (as in ``model.named_modules()``, e.g.
      ``"features.0"``) to linen paths (``"Conv_0"``, ``"block/bn"`` or a
      tuple of names); each submodule's variables go to that path.
    convention: ``"torch"`` (default: batch_stats include
      ``num_batches_tracked``) or ``"flax"`` (flax.linen's tree).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (collections without entries
    left out) of JAX arrays, for the linen twin(s) of `linen_from_torch`
    built with the same `convention`.

  Example:
    >>> import torch, jax
    >>> from jaxnorm import interop
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> variables = interop.variables_from_torch(model, {"0": "conv", "1": "bn"})
    >>> jax.tree_util.tree_map(lambda a: a.shape, variables)["params"]
    {'bn': {'bias': (4,), 'scale': (4,)}, 'conv': {'bias': (4,), 'kernel': (3, 3, 3, 4)}}
  """
  _check_convention(convention)
  out: dict[str, dict[str, Any]] = {}
  for _, sub, path in _pairs(module, names):
    for collection, tree in _module_variables(sub, convention).items():
      if not path:
        out[collection] = tree
        continue
      node = out.setdefault(collection, {})
      for part in path[:-1]:
        node = node.setdefault(part, {})
      if path[-1] in node:
        raise ValueError(f"`names`: two torch submodules map to the linen path {'/'.join(path)!r}.")
      node[path[-1]] = tree
  return out


# ---------------------------------------------------------------------------------------------------------------
# linen variables -> torch.


class _Source:
  """The variables of one linen module, read with errors that name the torch module and the linen path."""

  def __init__(self, variables: Mapping[str, Any], path: tuple[str, ...], label: str):
    self.label = label
    self.collections: dict[str, Any] = {}
    for collection, tree in variables.items():
      node = tree
      for part in path:
        if not isinstance(node, Mapping) or part not in node:
          node = None
          break
        node = node[part]
      if node is not None:
        self.collections[collection] = node

  def get(self, collection: str, *keys: str, required: bool = True) -> Any:
    node = self.collections.get(collection)
    for key in keys:
      node = node.get(key) if isinstance(node, Mapping) else None
    if node is None and required:
      raise ValueError(f"{self.label}: the variables have no {collection}/{'/'.join(keys)}.")
    return node


def _tensor(a: Any, like: Any, key: str) -> Any:
  """A JAX/numpy array as a tensor of `like`'s dtype, device and (checked) shape."""
  torch = _torch()
  a = np.asarray(a)
  if tuple(a.shape) != tuple(like.shape):
    raise ValueError(f"{key}: expected shape {tuple(like.shape)} for torch, got {tuple(a.shape)}.")
  # Through float64 (or int64): exact for every float (int) dtype, bfloat16 included, which numpy lacks.
  a = a.astype(np.float64 if like.is_floating_point() else np.int64)
  return torch.from_numpy(a).to(dtype=like.dtype, device=like.device)


def _weight(kernel: Any) -> np.ndarray:
  """flax ``(k..., in, out)`` -> torch ``(out, in, k...)``."""
  kernel = np.asarray(kernel)
  return np.transpose(kernel, (kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2)))


def _module_state(module: Any, src: _Source) -> dict[str, Any]:
  """New values for the entries of ``module.state_dict()`` that the variables determine."""
  kind = _kind(module)
  state = module.state_dict()
  new: dict[str, Any] = {}

  def put(key: str, value: Any) -> None:
    new[key] = _tensor(value, state[key], f"{src.label}: {key}")

  if kind in ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"):
    if "weight" in state:
      put("weight", src.get("params", "scale"))
    if "bias" in state:
      put("bias", src.get("params", "bias"))
    if kind == "batch_norm" and module.track_running_stats:
      mean, var = src.get("batch_stats", "mean"), src.get("batch_stats", "var")
      steps = src.get("batch_stats", "num_batches_tracked", required=False)
      _check_running_statistics(f"{src.label}: batch_stats", {"mean": mean, "var": var}, steps, np.iinfo(np.int64).max)
      put("running_mean", mean)
      put("running_var", var)
      if steps is not None:  # absent under convention="flax": torch's counter is kept
        put("num_batches_tracked", steps)
    return new
  parametrization, p = _weight_parametrization(module)
  layer = () if parametrization is None else ("layer_instance",)
  kernel = _weight(src.get("params", *layer, "kernel"))
  if "bias" in state:
    put("bias", src.get("params", *layer, "bias"))
  if parametrization is None:
    put("weight", kernel)
  elif parametrization == "weight_norm":
    put("parametrizations.weight.original1", kernel)
    g = np.asarray(src.get("params", _WN_SCALE))
    put("parametrizations.weight.original0", g.reshape(state["parametrizations.weight.original0"].shape))
  else:
    torch = _torch()
    put("parametrizations.weight.original", kernel)
    u = np.asarray(src.get("batch_stats", _SN_U)).reshape(-1)
    put("parametrizations.weight.0._u", u)
    # torch's last power-iteration step leaves v = normalize(W^T u); torch reads it at inference.
    w = new["parametrizations.weight.original"]
    u_t = new["parametrizations.weight.0._u"]
    v = torch.nn.functional.normalize(w.reshape(w.shape[0], -1).T @ u_t, dim=0, eps=p.eps)
    new["parametrizations.weight.0._v"] = v.to(state["parametrizations.weight.0._v"].dtype)
  return new


def torch_state_dict(
    variables: Mapping[str, Any], module: Any, names: Mapping[str, Path] | None = None
) -> dict[str, Any]:
  """Linen variables as a ``state_dict`` for a torch module or model: the inverse of `variables_from_torch`.

  Every entry of ``module.state_dict()`` is returned: those the variables
  determine are converted (transposed, reshaped, cast to the torch tensor's
  dtype and device, shapes checked), the rest are copies of the module's own
  (e.g. ``num_batches_tracked`` when the variables are flax-convention, or
  submodules not in `names`). The module is not modified; load the result
  with ``module.load_state_dict(state)``.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of the linen twin(s).
    module: the torch module (or model) to produce a state dict for.
    names: as in `variables_from_torch`: torch submodule names -> linen paths.

  Returns:
    A dict of torch tensors, keyed like ``module.state_dict()``.

  Example:
    >>> import jax, jax.numpy as jnp, torch
    >>> from jaxnorm import interop, linen as jnn
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> variables = interop.linen_from_torch(bn).init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=True)
    >>> variables["params"]["scale"] = jnp.array([1.0, 2.0, 3.0])
    >>> _ = bn.load_state_dict(interop.torch_state_dict(variables, bn))
    >>> bn.weight.tolist()
    [1.0, 2.0, 3.0]
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f"`variables` must be a mapping of collections, got {type(variables).__name__}.")
  state = {k: v.detach().clone() for k, v in module.state_dict().items()}
  for torch_name, sub, path in _pairs(module, names):
    where = f"torch module {torch_name!r}" if torch_name else "the torch module"
    label = f"{where} ({type(sub).__name__}) at linen path {'/'.join(path)!r}" if path else where
    for key, value in _module_state(sub, _Source(variables, path, label)).items():
      state[f"{torch_name}.{key}" if torch_name else key] = value
  return state
