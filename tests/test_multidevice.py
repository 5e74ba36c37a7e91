"""Cross-device statistics on 8 (forced host) CPU devices: every op and module with batch statistics.

JAX fixes the number of host devices when its backend starts, so this file
runs itself (`python tests/test_multidevice.py`, see `_worker`) once in a
subprocess started with ``--xla_force_host_platform_device_count=8``; that
process compiles and runs every case and prints one JSON report, and the
pytest functions below only read it. (A conftest that sets XLA_FLAGS would
change the device count for every other test of the session.) To keep
compile time down, the cases of one transform are compiled as one program;
should that fail, each case is compiled on its own, so that the report
names the one that fails.

The ops: `moments`, `batch_norm` (masked and not), `batch_renorm`,
`ghost_batch_norm`, and the linen `BatchNorm`, `BatchRenorm`,
`GhostBatchNorm`. Each runs on 8 shards of 4 rows whose means differ and
whose numbers of valid elements per feature differ (0 to 4, via
``where=``/``mask=``), in float64, under

* `jax.shard_map` (default ``check_vma=True``) with replicated parameters
  `P()`: outputs and gradients of one loss over all devices (grad outside),
  and the data-parallel pattern (grad inside, per device);
* `jax.shard_map` over a 2-D mesh ``("a", "b")``, with ``axis_name=("a", "b")``
  and with ``"b"`` alone (statistics per row of the mesh);
* `jax.pmap`, both ways;
* `jax.jit` on arrays with a `NamedSharding` over the batch axis and no
  axis_name (XLA's partitioner inserts the collectives; checked present);
* `jax.vmap` with an axis_name, and two nested vmaps with two axis names;
* `axis_index_groups` under `pmap` and under `shard_map(check_vma=False)`
  (under the default ``check_vma=True`` JAX does not implement them, and
  jaxnorm says so in a ValueError naming `axis_index_groups`).

The reference for each is the same op on one device and the whole batch
(for the ghost ops: the rows regrouped so that chunk g of every device forms
one virtual batch, which is what `axis_name` means there; for groups: each
group's devices on their own). The losses put random cotangents on the
output and on every device's copy of the statistics (the updated running
statistics for the modules). Those single-device results are in turn checked
against independent references: a float64 NumPy batch norm and moments, and
`flax.linen.BatchNorm` (one device with a mask; and across devices without
one, where flax's mean of per-device means is exact). Also shown: with
unequal valid counts, a mean of per-device means (`lax.pmean`, and flax) is
wrong by far more than rounding.

Collectives are counted in the compiled HLO of a shard_map'd `batch_norm`:
2 all-reduces in the forward (count and sum, stacked; then the sums of
deviations about the global mean and of their squares, stacked) and 3 for
forward plus backward (the kernel's backward adds one stacked psum of
``sum(h)`` and ``sum(h * xhat)``; XLA's all-reduce combiner folds the
parameter-gradient sums of replicated `scale`/`bias` into it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback

import pytest


D, N, C, V = 8, 4, 3, 2  # devices, rows per device, features, virtual batch size (ghost ops)
GROUPS = ((0, 2, 4, 6), (1, 3, 5, 7))  # axis_index_groups: interleaved, so that order matters
MESH_ROWS = ((0, 1, 2, 3), (4, 5, 6, 7))  # the devices of each row of the 2-D mesh (2, 4)
R_MAX, D_MAX, MOMENTUM = 1.5, 0.5, 0.9
TOL = 1e-9  # float64: every case is the same arithmetic up to the order of summation

OPS = (
    "moments",
    "batch_norm",
    "batch_norm_unmasked",
    "batch_renorm",
    "ghost_batch_norm",
    "linen.BatchNorm",
    "linen.BatchRenorm",
    "linen.GhostBatchNorm",
)
_ALL = tuple(op for op in OPS if op != "batch_norm_unmasked")
_SOME = ("batch_norm", "ghost_batch_norm", "linen.BatchNorm")  # one of each kind: plain, ghost, module
# Which ops run under which transform. The unmasked batch_norm (a static count, no mask)
# runs where the collectives differ.
TRANSFORMS = {
    "shard_map": OPS,
    "shard_map_grad_inside": _ALL,
    "shard_map_2d_mesh": _SOME,
    "shard_map_2d_mesh_inner_axis": _SOME,
    "pmap": OPS,
    "pmap_grad_inside": _ALL,
    "jit_named_sharding": OPS,
    "vmap": _ALL,
    "nested_vmap": _ALL,
    "pmap_axis_index_groups": _ALL,
    "shard_map_axis_index_groups": _ALL,
}
CASES = tuple(f"{t}/{op}" for t, names in TRANSFORMS.items() for op in names)


# ---------------------------------------------------------------------------------------------
# The worker: runs in the 8-device subprocess only.
# ---------------------------------------------------------------------------------------------


def _worker():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxnorm
  from _flax_reference import flax_promotion  # tests/ is this script's directory
  from jaxnorm import linen as jnn

  jax.config.update("jax_enable_x64", True)
  assert len(jax.devices()) == D, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("i",))
  mesh2 = Mesh(np.array(jax.devices()).reshape(2, D // 2), ("a", "b"))
  tm = jax.tree_util.tree_map
  r = np.random.default_rng(0)
  t_start = time.perf_counter()

  # 8 shards of N rows; shard d is shifted by 2d, and holds counts[d, c] valid rows of feature c.
  x = r.normal(size=(D * N, C)) + np.repeat(np.arange(D) * 2.0, N)[:, None]
  counts = np.array([[1, 4, 2], [3, 0, 4], [4, 2, 1], [2, 4, 3], [0, 1, 4], [4, 3, 2], [1, 2, 0], [3, 4, 4]])
  where = (np.arange(N)[None, :, None] < counts[:, None, :]).reshape(D * N, C)
  scale, bias = r.normal(size=C), r.normal(size=C)
  run_mean, run_var = r.normal(size=C), r.uniform(0.3, 3.0, size=C)  # make renorm's r and d clip

  # ---- the ops: op(x, w, params, axis_name, groups, v) -> {"y": like x (not for moments), "stats": pytree}

  def op_moments(x, w, p, an, g, v=V):
    mean, var = jaxnorm.moments(x, 0, where=w, axis_name=an, axis_index_groups=g)
    return {"stats": {"mean": mean, "var": var}}

  def op_batch_norm(x, w, p, an, g, v=V):
    y, mean, var = jaxnorm.batch_norm(x, p["scale"], p["bias"], where=w, axis_name=an, axis_index_groups=g)
    return {"y": y, "stats": {"mean": mean, "var": var}}

  def op_batch_norm_unmasked(x, w, p, an, g, v=V):
    return op_batch_norm(x, None, p, an, g)

  def op_batch_renorm(x, w, p, an, g, v=V):
    y, mean, var = jaxnorm.batch_renorm(
        x, p["scale"], p["bias"], p["rm"], p["rv"], r_max=R_MAX, d_max=D_MAX, where=w, axis_name=an,
        axis_index_groups=g,
    )
    return {"y": y, "stats": {"mean": mean, "var": var}}

  def op_ghost(x, w, p, an, g, v=V):
    y, mean, var = jaxnorm.ghost_batch_norm(
        x, p["scale"], p["bias"], virtual_batch_size=v, where=w, axis_name=an, axis_index_groups=g
    )
    return {"y": y, "stats": {"mean": mean, "var": var}}

  def linen_op(cls, **kw):
    def op(x, w, p, an, g, v=V):
      extra = {"virtual_batch_size": v} if cls is jnn.GhostBatchNorm else {}
      module = cls(use_running_average=False, momentum=MOMENTUM, axis_name=an, axis_index_groups=g, **kw, **extra)
      y, updates = module.apply(p, x, mask=w, mutable=["batch_stats"])
      return {"y": y, "stats": updates["batch_stats"]}

    return op

  def linen_vars(cls, **kw):
    """flax's variable tree with non-trivial values (running statistics that make renorm's r and d clip)."""
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": run_mean, "var": run_var}}
    init = cls(use_running_average=False, **kw).init(jax.random.key(0), x[:N])
    assert jax.tree.structure(init) == jax.tree.structure(variables), init
    return variables

  fparams = {"scale": scale, "bias": bias}
  renorm = dict(r_max=R_MAX, d_max=D_MAX)
  ops = {  # name: (op, params, ghost)
      "moments": (op_moments, {}, False),
      "batch_norm": (op_batch_norm, fparams, False),
      "batch_norm_unmasked": (op_batch_norm_unmasked, fparams, False),
      "batch_renorm": (op_batch_renorm, {**fparams, "rm": run_mean, "rv": run_var}, False),
      "ghost_batch_norm": (op_ghost, fparams, True),
      "linen.BatchNorm": (linen_op(jnn.BatchNorm), linen_vars(jnn.BatchNorm), False),
      "linen.BatchRenorm": (linen_op(jnn.BatchRenorm, **renorm), linen_vars(jnn.BatchRenorm, **renorm), False),
      "linen.GhostBatchNorm": (linen_op(jnn.GhostBatchNorm), linen_vars(jnn.GhostBatchNorm), True),
  }
  assert tuple(ops) == OPS

  # ---- references on one device: layout {"y": (rows, ...), "stats": (devices, ...) per leaf} -------

  def per_device_stats(out, d):
    """Every device holds the same statistics: broadcast them to d copies."""
    return {**out, "stats": tm(lambda a: jnp.broadcast_to(a, (d, *a.shape)), out["stats"])}

  def reference(op, ghost, x, w, p):
    """What `op` with an axis_name over the shards of `x` (N rows each) must return, on one device."""
    d = x.shape[0] // N
    if not ghost:
      return per_device_stats(op(x, w, p, None, None), d)
    # Chunk k of every device is one virtual batch: regroup the rows, normalize, put them back.
    perm = np.arange(d * N).reshape(d, N // V, V).transpose(1, 0, 2).reshape(-1)
    out = op(x[perm], None if w is None else w[perm], p, None, None, v=d * V)
    return per_device_stats({**out, "y": out["y"][np.argsort(perm)]}, d)

  def reference_groups(op, ghost, x, w, p, groups):
    """Each group of devices on its own."""
    rows = [np.concatenate([np.arange(k * N, (k + 1) * N) for k in g]) for g in groups]
    outs = [reference(op, ghost, x[i], None if w is None else w[i], p) for i in rows]
    device_order = np.argsort(np.concatenate(groups))
    result = {"stats": tm(lambda *a: jnp.concatenate(a)[device_order], *[o["stats"] for o in outs])}
    if "y" in outs[0]:
      result["y"] = jnp.concatenate([o["y"] for o in outs])[np.argsort(np.concatenate(rows))]
    return result

  def plain(op, x, w, p):
    """The op on the whole batch without axis_name (for ghost ops, chunks of the global batch)."""
    return per_device_stats(op(x, w, p, None, None), x.shape[0] // N)

  # ---- the transforms: each returns the layout of `reference` ---------------------------------

  def unstack(out, lead):
    """(devices..., N, ...) rows back to (D * N, ...); statistics (devices..., ...) to (D, ...)."""
    res = {"stats": tm(lambda a: a.reshape(D, *a.shape[lead:]), out["stats"])}
    if "y" in out:
      res["y"] = out["y"].reshape(D * N, *out["y"].shape[lead + 1 :])
    return res

  def stack(a, shape=(D,)):
    return None if a is None else a.reshape(*shape, N, *a.shape[1:])

  def with_device_axis(out):
    return {**out, "stats": tm(lambda a: a[None], out["stats"])}

  def via_shard_map(op, the_mesh=mesh, axis_name="i", groups=None, check_vma=True):
    rows = P(the_mesh.axis_names)  # the batch split over every mesh axis, in device order

    def run(x, w, p):
      body = lambda x, w, p: with_device_axis(op(x, w, p, axis_name, groups))  # noqa: E731
      in_specs = (rows, None if w is None else rows, P())
      return jax.shard_map(body, mesh=the_mesh, in_specs=in_specs, out_specs=rows, check_vma=check_vma)(x, w, p)

    return run

  def via_pmap(op, groups=None):
    def run(x, w, p):
      f = jax.pmap(lambda x, w, p: op(x, w, p, "i", groups), axis_name="i", in_axes=(0, 0, None))
      return unstack(f(stack(x), stack(w), p), 1)

    return run

  def via_vmap(op):
    def run(x, w, p):
      return unstack(jax.vmap(lambda x, w: op(x, w, p, "i", None), axis_name="i")(stack(x), stack(w)), 1)

    return run

  def via_nested_vmap(op):
    def run(x, w, p):
      inner = jax.vmap(lambda x, w: op(x, w, p, ("i", "j"), None), axis_name="j")
      shape = (2, D // 2)
      return unstack(jax.vmap(inner, axis_name="i")(stack(x, shape), stack(w, shape)), 2)

    return run

  # ---- losses, comparisons, batched compilation -----------------------------------------------

  def cotangents(out):
    g = np.random.default_rng(1)
    return tm(lambda a: g.normal(size=a.shape), out)

  def loss(out, ct):
    return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ct)))

  def value_and_grads(run, ct):
    """(x, w, p) -> (outputs, (d loss/dx, d loss/dp))."""

    def f(x, w, p):
      def objective(x, p):
        out = run(x, w, p)
        return loss(out, ct), out

      (_, out), grads = jax.value_and_grad(objective, (0, 1), has_aux=True)(x, p)
      return out, grads

    return f

  def err(a, b, label):
    """Largest deviation relative to the reference's magnitude (at least 1) over a pytree, and its leaf."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
    e, leaf = 0.0, ""
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      u, v = np.asarray(u), np.asarray(v)
      d = float(np.abs(u - v).max() / max(1.0, np.abs(v).max())) if u.size else 0.0
      if d > e:
        e, leaf = d, label + jax.tree_util.keystr(path)
    return e, leaf

  def compare(got, want, labels=("out", "grad")):
    (e_out, w_out), (e_grad, w_grad) = err(got[0], want[0], labels[0]), err(got[1], want[1], labels[1])
    return {"out": e_out, "grad": e_grad, "worst": [w_out, w_grad]}

  results, seconds = {}, {}

  def failure(e):
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}

  def batched(prefix, names, make, compile_fn=None):
    """Runs `make(name) -> (fn, args, check)` for every name as one jitted program.

    `fn(args)` is traced; `check(output)` returns the result to report.
    Returns the raw outputs by name. If the joint program fails, each case
    runs on its own, so that a failure is reported against its case.
    """
    t = time.perf_counter()
    built, outs = {}, {}
    for name in names:
      try:
        built[name] = make(name)
      except Exception as e:
        results[f"{prefix}/{name}"] = failure(e)

    def joint(args):
      return {name: built[name][0](args[name]) for name in args}

    def run(names):
      return (compile_fn or jax.jit)(joint)({name: built[name][1] for name in names})

    try:
      outs = run(built)
    except Exception:
      for name in built:
        try:
          outs.update(run([name]))
        except Exception as e:
          results[f"{prefix}/{name}"] = failure(e)
    for name, out in outs.items():
      try:
        results[f"{prefix}/{name}"] = built[name][2](out)
      except Exception as e:
        results[f"{prefix}/{name}"] = failure(e)
    seconds[prefix] = round(time.perf_counter() - t, 2)
    return outs

  def single(name, ref_fn):
    """A reference case: value and gradients of `ref_fn(op, ghost, x, w, p)` on one device."""
    op, p, ghost = ops[name]
    run = lambda x, w, p: ref_fn(op, ghost, x, w, p)  # noqa: E731
    ct = cotangents(jax.eval_shape(run, x, where, p))
    return ct, value_and_grads(run, ct)

  # ---- references ------------------------------------------------------------------------------

  ref_fns = {
      "global": reference,
      "groups": lambda op, ghost, x, w, p: reference_groups(op, ghost, x, w, p, GROUPS),
      "mesh_rows": lambda op, ghost, x, w, p: reference_groups(op, ghost, x, w, p, MESH_ROWS),
      "plain": lambda op, ghost, x, w, p: plain(op, x, w, p),
  }
  cts, refs = {}, {}
  for kind, ref_fn in ref_fns.items():
    # Only what the cases below need; "plain" is "global" unless the op is a ghost one.
    names = {"global": OPS, "groups": _ALL, "mesh_rows": _SOME, "plain": [n for n in OPS if ops[n][2]]}[kind]

    def make(name, kind=kind, ref_fn=ref_fn):
      cts[kind, name], f = single(name, ref_fn)
      return (lambda a: f(*a)), (x, where, ops[name][1]), (lambda out: {})

    outs = batched(f"reference_{kind}", names, make)
    refs.update({(kind, name): out for name, out in outs.items()})
  for name in OPS:
    if not ops[name][2]:
      cts["plain", name], refs["plain", name] = cts["global", name], refs.get(("global", name))

  # ---- the cases ------------------------------------------------------------------------------

  def outer(via, kind="global"):
    """Grad outside the map: outputs and gradients of the loss over all devices."""

    def make(name):
      op, p, _ = ops[name]
      f = value_and_grads(via(op), cts[kind, name])
      return (lambda a: f(*a)), (x, where, p), (lambda got: compare(got, refs[kind, name]))

    return make

  def grad_inside(transform):
    """Data parallelism: each device differentiates its own share of the loss.

    Its x-gradient must be the global one (the backward sums over devices).
    Parameter gradients: under pmap each device gets its share, and the shares
    add up to the global gradient; under shard_map (check_vma) JAX transposes
    the implicit cast of a replicated parameter into a sum over devices, so
    every device gets the global gradient itself.
    """

    def make(name):
      op, p, _ = ops[name]
      ct = cts["global", name]

      def local_loss(x, w, p, ct_y, ct_stats, axis_name):
        out = op(x, w, p, axis_name, None)
        return loss(out, {**({} if ct_y is None else {"y": ct_y}), "stats": ct_stats})

      if transform == "shard_map":

        def body(x, w, p, ct_y, ct_stats):
          gx, gp = jax.grad(local_loss, (0, 2))(x, w, p, ct_y, tm(lambda a: a[0], ct_stats), "i")
          return gx, tm(lambda a: a[None], gp)

        specs = (P("i"), P("i"), P(), P("i"), P("i"))
        fn = lambda a: jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("i"))(*a)  # noqa: E731
      else:
        f = jax.pmap(
            lambda x, w, p, ct_y, ct_stats: jax.grad(local_loss, (0, 2))(x, w, p, ct_y, ct_stats, "i"),
            axis_name="i",
            in_axes=(0, 0, None, 0, 0),
        )
        fn = lambda a: f(stack(a[0]), stack(a[1]), a[2], stack(a[3]), a[4])  # noqa: E731

      def check(got):
        gx, gp = got
        _, (gx_ref, gp_ref) = refs["global", name]
        if transform == "shard_map":
          gp_ref = tm(lambda a: np.broadcast_to(a, (D, *a.shape)), gp_ref)
        else:
          gp = tm(lambda a: a.sum(0), gp)
        (e_x, w_x), (e_p, w_p) = err(np.reshape(gx, (D * N, C)), gx_ref, "dx"), err(gp, gp_ref, "dparams")
        return {"out": 0.0, "grad": max(e_x, e_p), "worst": [w_x, w_p]}

      return fn, (x, where, p, ct.get("y"), ct["stats"]), check

    return make

  collectives = {}

  def sharded_compile(fn):
    """jit on batch-sharded arrays (parameters replicated); keeps the compiled HLO's collectives."""

    def run(args):
      rows, rep = NamedSharding(mesh, P("i")), NamedSharding(mesh, P())
      args = {k: tuple(jax.device_put(a, s) for a, s in zip(xwp, (rows, rows, rep))) for k, xwp in args.items()}
      compiled = jax.jit(fn).lower(args).compile()
      kinds = r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\b"
      found = re.findall(kinds, compiled.as_text())
      collectives.update({k: sorted(set(found)) for k in args})
      return compiled(args)

    return run

  def jit_sharded(name):
    """Plain jit on batch-sharded arrays, no axis_name: the single-device answer, and y stays sharded."""
    op, p, _ = ops[name]
    f = value_and_grads(lambda x, w, p: plain(op, x, w, p), cts["plain", name])

    def check(got):
      result = compare(got, refs["plain", name])
      result["collectives"] = collectives.get(name, [])
      result["y_sharded_over"] = len(got[0]["y"].sharding.device_set) if "y" in got[0] else D
      return result

    return (lambda a: f(*a)), (x, where, p), check

  cases = {
      "shard_map": outer(via_shard_map),
      "shard_map_grad_inside": grad_inside("shard_map"),
      "shard_map_2d_mesh": outer(lambda op: via_shard_map(op, mesh2, ("a", "b"))),
      "shard_map_2d_mesh_inner_axis": outer(lambda op: via_shard_map(op, mesh2, "b"), "mesh_rows"),
      "pmap": outer(via_pmap),
      "pmap_grad_inside": grad_inside("pmap"),
      "jit_named_sharding": jit_sharded,
      "vmap": outer(via_vmap),
      "nested_vmap": outer(via_nested_vmap),
      "pmap_axis_index_groups": outer(lambda op: via_pmap(op, GROUPS), "groups"),
      "shard_map_axis_index_groups": outer(lambda op: via_shard_map(op, groups=GROUPS, check_vma=False), "groups"),
  }
  assert tuple(cases) == tuple(TRANSFORMS)
  for transform, names in TRANSFORMS.items():
    batched(transform, names, cases[transform], sharded_compile if transform == "jit_named_sharding" else None)

  # ---- independent anchors, flax, the naive merge, HLO, errors ----------------------------------

  def record(name, fn):
    t = time.perf_counter()
    try:
      results[name] = fn()
    except Exception as e:
      results[name] = failure(e)
    seconds[name] = round(time.perf_counter() - t, 2)

  def np_moments(x, w):
    xm = np.ma.masked_array(x, mask=~w)
    return xm.mean(0).filled(0.0), xm.var(0).filled(0.0)

  def flax_apply(module, variables, x, mask):
    return module.apply(variables, x, mask=mask, mutable=["batch_stats"])

  def flax_bn(**kw):
    return nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, use_fast_variance=False, **kw)

  def anchors():
    """The single-device references against float64 NumPy and flax.linen.BatchNorm (masked, one device)."""
    mean, var = np_moments(x, where)
    bn, mom, lbn = (refs["global", n][0] for n in ("batch_norm", "moments", "linen.BatchNorm"))
    with flax_promotion():
      y_flax, up_flax = jax.jit(lambda x, w: flax_apply(flax_bn(), ops["linen.BatchNorm"][1], x, w))(x, where)
    return {
        "batch_norm_vs_numpy": max(
            err(bn["y"], (x - mean) / np.sqrt(var + 1e-5) * scale + bias, "")[0],
            err(bn["stats"]["mean"][0], mean, "")[0],
            err(bn["stats"]["var"][0], var, "")[0],
        ),
        "moments_vs_numpy": max(err(mom["stats"]["mean"][0], mean, "")[0], err(mom["stats"]["var"][0], var, "")[0]),
        "linen_BatchNorm_vs_flax": max(
            err(lbn["y"], y_flax, "")[0], err(tm(lambda a: a[0], lbn["stats"]), up_flax["batch_stats"], "")[0]
        ),
    }

  def flax_cross_device():
    """Equal counts (no mask): flax's pmean of per-device means is exact, so flax is a reference across devices."""
    variables = ops["linen.BatchNorm"][1]

    @jax.jit
    def run(x):
      def body(module):
        return lambda x: with_device_axis(dict(zip(("y", "stats"), flax_apply(module, variables, x, None))))

      sm = lambda module: jax.shard_map(body(module), mesh=mesh, in_specs=P("i"), out_specs=P("i"))(x)  # noqa: E731
      ours = sm(jnn.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name="i"))
      with flax_promotion():
        return ours, sm(flax_bn(axis_name="i")), flax_apply(flax_bn(), variables, x, None)

    ours, theirs, single_flax = run(x)
    return {"out": max(err(ours, theirs, "")[0], err(ours["y"], single_flax[0], "")[0])}

  def naive_merge():
    """Unequal counts: the mean over devices of per-device statistics (lax.pmean; flax) is not the global one."""
    variables = ops["linen.BatchNorm"][1]
    w1 = where.copy()
    w1[np.arange(D) * N] = True  # at least one valid row per device and feature: per-device means exist

    def sm(f):
      return jax.shard_map(f, mesh=mesh, in_specs=(P("i"), P("i")), out_specs=(P(), P()))

    def flax_stats(x, w):
      with flax_promotion():
        stats = flax_apply(flax_bn(axis_name="i"), variables, x, w)[1]["batch_stats"]
      return stats["mean"], stats["var"]

    @jax.jit
    def run(x, w):
      return (
          sm(lambda x, w: jax.lax.pmean(jaxnorm.moments(x, 0, where=w), "i"))(x, w),
          sm(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="i"))(x, w),
          sm(flax_stats)(x, w),
          reference(ops["linen.BatchNorm"][0], False, x, w, variables)["stats"],
      )

    naive, exact, flax_s, ours = run(x, w1)
    mean, var = np_moments(x, w1)
    return {
        "exact": max(err(exact[0], mean, "")[0], err(exact[1], var, "")[0]),
        # absolute deviations: the global mean is about 7, the variance about 21
        "naive_mean": float(np.abs(naive[0] - mean).max()),
        "naive_var": float(np.abs(naive[1] - var).max()),
        "flax_running_mean": float(np.abs(flax_s[0] - ours["mean"][0]).max()),
        "flax_running_var": float(np.abs(flax_s[1] - ours["var"][0]).max()),
    }

  def all_reduces(f, *args):
    txt = jax.jit(f).lower(*args).compile().as_text()
    return len(re.findall(r"\ball-reduce(?:-start)?\(", txt))

  def hlo_counts():
    ct = r.normal(size=x.shape)
    counts = {}
    for label, w in (("masked", where), ("unmasked", None)):
      spec = None if w is None else P("i")
      fwd = jax.shard_map(
          lambda x, s, b, w: jaxnorm.batch_norm(x, s, b, where=w, axis_name="i"),
          mesh=mesh,
          in_specs=(P("i"), P(), P(), spec),
          out_specs=(P("i"), P(), P()),
      )
      y_loss = lambda x, s, b: jnp.sum(fwd(x, s, b, w)[0] * ct)  # noqa: E731
      counts[label] = {
          "forward": all_reduces(lambda x, s, b: fwd(x, s, b, w), x, scale, bias),
          "forward_backward": all_reduces(jax.grad(y_loss, (0, 1, 2)), x, scale, bias),
      }
    return counts

  def check_vma_groups():
    f = jax.shard_map(
        lambda x: jaxnorm.batch_norm(x, axis_name="i", axis_index_groups=GROUPS)[0],
        mesh=mesh,
        in_specs=P("i"),
        out_specs=P("i"),
    )
    try:
      jax.jit(f).lower(x)
    except Exception as e:
      return {"raised": type(e).__name__, "message": str(e)[:1000]}
    return {"raised": None, "message": ""}

  record("anchors", anchors)
  record("flax_cross_device_equal_counts", flax_cross_device)
  record("mean_of_device_means_is_wrong", naive_merge)
  record("hlo_all_reduce_count", hlo_counts)
  record("shard_map_check_vma_axis_index_groups_error", check_vma_groups)
  total = round(time.perf_counter() - t_start, 1)
  print(json.dumps({"devices": len(jax.devices()), "seconds": total, "phases": seconds, "results": results}))


# ---------------------------------------------------------------------------------------------
# The tests: read the worker's report.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={D}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  data = json.loads(proc.stdout.strip().splitlines()[-1])
  assert data["devices"] == D
  return data["results"]


def _result(report, name):
  result = report[name]
  assert "error" not in result, f"{name} raised {result['error']}\n{result.get('traceback', '')}"
  return result


def test_single_device_references_ran(report):
  failed = {k: v["error"] for k, v in report.items() if k.startswith("reference_") and "error" in v}
  assert not failed, failed


@pytest.mark.parametrize("case", CASES)
def test_matches_single_device_global_result(report, case):
  """Outputs and gradients of the mapped/sharded op equal the same op on one device and the whole batch."""
  result = _result(report, case)
  assert result["out"] < TOL, f"{case}: outputs deviate by {result['out']:.3g} at {result['worst'][0]}"
  assert result["grad"] < TOL, f"{case}: gradients deviate by {result['grad']:.3g} at {result['worst'][1]}"
  if case.startswith("jit_named_sharding/"):
    # The batch really was split: XLA had to insert collectives, and the output stays split.
    assert "all-reduce" in result["collectives"], f"{case}: no all-reduce in the compiled HLO"
    assert result["y_sharded_over"] == D, result


@pytest.mark.parametrize("check", ["batch_norm_vs_numpy", "moments_vs_numpy", "linen_BatchNorm_vs_flax"])
def test_single_device_reference_matches_independent_reference(report, check):
  assert _result(report, "anchors")[check] < TOL


def test_linen_batch_norm_matches_flax_across_devices_with_equal_counts(report):
  """flax.linen.BatchNorm(axis_name) under shard_map: outputs and running statistics (pmean is exact here)."""
  assert _result(report, "flax_cross_device_equal_counts")["out"] < TOL


def test_mean_of_per_device_means_is_wrong_with_unequal_counts(report):
  """lax.pmean of per-device statistics (and flax.linen.BatchNorm with a mask) is off by far more than rounding."""
  result = _result(report, "mean_of_device_means_is_wrong")
  assert result["exact"] < TOL
  assert result["naive_mean"] > 0.1 and result["naive_var"] > 1.0, result
  assert result["flax_running_mean"] > 0.01 and result["flax_running_var"] > 0.1, result


def test_shard_map_batch_norm_all_reduce_count(report):
  """Forward: 2 stacked psums (count+sum, then deviation sums); backward: 1 (sum(h), sum(h*xhat))."""
  result = _result(report, "hlo_all_reduce_count")
  for label in ("masked", "unmasked"):
    assert result[label] == {"forward": 2, "forward_backward": 3}, result


def test_shard_map_check_vma_axis_index_groups_clear_error(report):
  result = _result(report, "shard_map_check_vma_axis_index_groups_error")
  assert result["raised"] == "ValueError", result
  assert "axis_index_groups" in result["message"] and "check_vma" in result["message"], result


if __name__ == "__main__":
  _worker()
