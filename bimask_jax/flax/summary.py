"""Inspecting and exporting a sparse model: :func:`summary` (per-layer table and data) and
:func:`export` (plain variables with the forward masks applied, for the unwrapped model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

from bimask_jax.flax import linen as _linen
from bimask_jax.flax import nnx as _nnx
from bimask_jax.flax.layer import stacked_masks
from bimask_jax.flax.state import config_of, entries, is_linen, nnx_view
from bimask_jax.permutation import retained_upper_bound, search_efficacy

_COLUMNS = (
    "path",
    "kind",
    "kernel_shape",
    "status",
    "method",
    "fwd_density",
    "bwd_density",
    "bwd_retained",
    "efficacy",
    "note",
)


def _stats(e, n: int, m: int) -> dict:
    """Mask statistics of one (possibly stacked) sparse layer entry."""
    fwd, bwd = stacked_masks(e["kernel"], e["perm"], n, m, e["method"])
    f = int(jnp.sum(fwd))
    b = int(jnp.sum(bwd))
    out = dict(
        fwd_density=f / fwd.size,
        bwd_density=b / bwd.size,
        bwd_retained=(b / f) if f else 0.0,
        efficacy=None,
    )
    if e["method"] == "bimask":
        c = fwd.shape[-1]
        # identity permutation: groups are m consecutive columns
        ident = int(jnp.minimum(fwd.reshape(-1, c // m, m).sum(-1), n).sum())
        upper = int(retained_upper_bound(fwd.reshape(-1, c), n, m))
        out["efficacy"] = float(search_efficacy(b, ident, upper))
    return out


def _kernel_shape(params, path):
    try:
        node = params
        for k in path:
            node = node[k]
        return tuple(meta.unbox(node["kernel"]).shape)
    except (KeyError, TypeError):
        return None


def _linen_rows(model, variables, sample_args, sample_kwargs):
    rec = model.recorder
    if not rec.layers and sample_args is not None:
        jax.eval_shape(
            lambda v: model.apply(v, *sample_args, mutable=True, **(sample_kwargs or {})), variables
        )
    cfg = model.config
    ents = {"/".join(map(str, e["path"])): e for e in entries(model, variables)}
    rows = []
    order = list(rec.layers) + [p for p in ents if p not in rec.layers]
    for p in order:
        info = rec.layers.get(p, {})
        e = ents.get(p)
        path = tuple(p.split("/")) if p else ()
        row = dict(
            path=p,
            kind=info.get("kind", "?"),
            kernel_shape=_kernel_shape(variables.get("params", {}), path)
            or info.get("kernel_shape"),
        )
        if e is not None:
            row.update(
                status="sparse",
                method=e["method"],
                note=info.get("reason", ""),
                **_stats(e, cfg.n, cfg.m),
            )
        else:
            row.update(status="skipped", method="", note=info.get("reason", ""))
        rows.append(row)
    return rows


def _nnx_rows(model, state):
    view = nnx_view(model, state)
    ents = {e["path"]: e for e in entries(view)}
    rows = []
    for path, layer, op in _nnx.candidate_layers(view):
        row = dict(
            path=_nnx.path_str(path),
            kind=type(layer).__name__,
            kernel_shape=tuple(layer.kernel.shape),
        )
        if op is not None:
            e = ents[path]
            row.update(
                status="sparse",
                method=op.method,
                note=op.note,
                **_stats(e, op.config.n, op.config.m),
            )
        else:
            row.update(
                status="skipped",
                method="",
                note=getattr(layer, _nnx.SKIP_ATTR, "not processed by bimask_jax.sparse"),
            )
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of :func:`summary` rows."""

    def cell(r, k):
        v = r.get(k)
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, tuple):
            return "x".join(map(str, v))
        return str(v)

    table = [list(_COLUMNS)] + [[cell(r, k) for k in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(model, variables=None, *, sample_args=None, sample_kwargs=None, print_fn=print):
    """Per-layer report of a sparse model: which Dense/DenseGeneral/Conv (linen) or
    Linear/LinearGeneral/Conv (nnx) layers are sparse, with which method, and their masks.

    Args:
      model: a model from :func:`bimask_jax.sparse`.
      variables: linen: the variables from ``model.init``. nnx: optional ``nnx.State`` to use
        instead of the model's values.
      sample_args, sample_kwargs: linen only: model inputs, used (abstractly, ``jax.eval_shape``)
        to find the skipped layers when the model has not been initialized or applied in this
        process (skipped layers carry no state, so they are known only from a trace).
      print_fn: called with the text table; ``None`` to print nothing.

    Returns:
      list of dicts, one per layer in call (linen) or graph (nnx) order: ``path`` (``"a/b"``),
      ``kind``, ``kernel_shape`` (with stack axes of scanned layers), ``status`` (``"sparse"`` or
      ``"skipped"``), ``method`` (effective method), ``note`` (skip reason or fallback), and for
      sparse layers ``fwd_density`` (fraction of kernel entries kept by the forward mask),
      ``bwd_density`` and ``bwd_retained`` (backward-mask entries over forward-mask entries), and
      for ``"bimask"`` layers ``efficacy``: the share of the possible gain over the identity
      permutation that the layer's permutation achieved (``search_efficacy``; 1.0 when the
      identity is already optimal).
    """
    config_of(model)  # validates the model type
    if is_linen(model):
        if variables is None:
            raise ValueError("variables are required for a linen model")
        rows = _linen_rows(model, variables, sample_args, sample_kwargs)
    else:
        rows = _nnx_rows(model, variables)
    if print_fn is not None:
        print_fn(format_table(rows))
    return rows


def _masked_kernels(model, variables) -> dict:
    cfg = config_of(model)
    out = {}
    for e in entries(model, variables):
        if e["method"] == "dense":
            continue
        fwd, _ = stacked_masks(e["kernel"], e["perm"], cfg.n, cfg.m, e["method"])
        out[e["path"]] = jnp.where(fwd, e["kernel"], jnp.zeros((), e["kernel"].dtype))
    return out


def export(model, variables=None):
    """Inference weights: every sparse kernel multiplied by its forward mask.

    Returns:
      linen: the variables without the ``"bimask"`` collection (``params`` has the unwrapped
      model's tree; load with ``unwrapped.apply(exported, x)``). nnx: an ``nnx.State`` of every
      variable except :class:`BimaskState`; load with ``nnx.update(unwrapped_model, exported)``.
    """
    masked = _masked_kernels(model, variables)
    if is_linen(model):
        return _linen.export_variables(variables, masked)
    view = nnx_view(model, variables)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(view, nnx.Not(_nnx.BimaskState))):
        path = tuple(path)
        if path[-1] == "kernel" and path[:-1] in masked:
            var = var.replace(masked[path[:-1]])
        flat.append((path, var))
    return nnx.from_flat_state(flat)
