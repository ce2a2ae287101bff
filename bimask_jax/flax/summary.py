"""Inspecting and exporting a sparse model: :func:`layers` (the selection, per layer),
:func:`summary` (per-layer table and data) and :func:`export` (plain variables with the forward
masks applied, for the unwrapped model). One code path over the state of :mod:`.state`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bimask_jax.flax.layer import layer_matrix, record_masks, sste_kernel
from bimask_jax.flax.selection import effective_method, search_method
from bimask_jax.flax.state import flip_state, frontend, geometry, read
from bimask_jax.permutation import permutation_score, retained_upper_bound, search_efficacy

_COLUMNS = ("path", "kind", "kernel_shape", "status", "method", "fwd_density", "bwd_density",
            "bwd_retained", "efficacy", "note")


def layers(model, variables=None, *, sample_args=None, sample_kwargs=None):
    """Every Dense/DenseGeneral/Conv (linen) or Linear/LinearGeneral/Conv (nnx) layer of a model
    from :func:`bimask_jax.sparse` and the selection rule's outcome for it, as
    :class:`~bimask_jax.flax.selection.Layer` (``path``, ``kind``, ``kernel_shape``, ``sparse``,
    ``method``, ``note``: why a layer is skipped), in call (linen) or graph (nnx) order.

    linen: needs ``sample_args`` (and ``sample_kwargs``), inputs of the model, traced abstractly
    (``jax.eval_shape``, nothing is computed); ``variables`` is not used. This does not raise when
    no layer can be sparse (``init`` does): it tells why, per layer. nnx: ``variables`` is an
    optional ``nnx.State``; no inputs are needed.
    """
    fe = frontend(model)
    if fe.__name__.endswith("linen") and sample_args is None:
        raise ValueError("layers of a linen model: pass sample_args (model inputs, e.g. (x,))")
    return fe.layers(model, variables, sample_args, sample_kwargs)


def _stats(fwd, bwd, perm, method: str, n: int, m: int, k_order: str) -> dict:
    """Mask statistics of one (possibly stacked) sparse layer with masks ``fwd``, ``bwd``."""
    f, b = int(jnp.sum(fwd)), int(jnp.sum(bwd))
    out = dict(fwd_density=f / fwd.size, bwd_density=b / bwd.size,
               bwd_retained=(b / f) if f else 0.0, efficacy=None)
    if method == "bimask":
        c = perm.shape[-1]
        # the stacked matrices as one (S * K, C): each has K * C % m == 0 entries, so no group
        # (m consecutive entries, row-major, when they straddle rows) crosses two of them
        mat = layer_matrix(fwd, c, k_order, perm.ndim - 1).reshape(-1, c)
        ident = int(permutation_score(mat.astype(jnp.float32), mat, jnp.arange(c), n, m,
                                      k_order=k_order))
        upper = int(retained_upper_bound(mat, n, m, k_order=k_order))
        out["efficacy"] = float(search_efficacy(b, ident, upper))
    return out


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

    cols = _COLUMNS + (("flip_rate",) if any("flip_rate" in r for r in rows) else ())
    table = [list(cols)] + [[cell(r, k) for k in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
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
      sample_args, sample_kwargs: linen only: model inputs, traced abstractly (:func:`layers`) to
        list the skipped layers and their reasons and to order rows by call. Without them a
        linen summary lists the sparse layers only (skipped layers carry no state), by path.
      print_fn: called with the text table; ``None`` to print nothing.

    Returns:
      list of dicts, one per layer in call (linen) or graph (nnx) order: ``path`` (``"a/b"``),
      ``kind`` (None for a linen layer without sample inputs), ``kernel_shape`` (with stack axes
      of scanned layers), ``status`` (``"sparse"`` or ``"skipped"``), ``method`` (effective
      method), ``note`` (skip reason or fallback), and for sparse layers ``fwd_density`` (fraction
      of kernel entries kept by the forward mask), ``bwd_density`` and ``bwd_retained``
      (backward-mask entries over forward-mask entries), and for ``"bimask"`` layers
      ``efficacy``: the share of the possible gain over the identity permutation that the layer's
      permutation achieved (``search_efficacy``; 1.0 when the identity is already optimal);
      ``"sste"`` layers: ``sste_scale`` (float, or a list over the stack). With
      ``track_flips=True`` every sparse row has ``flip_rate`` (forward-mask entries changed since
      the last :func:`~bimask_jax.flax.state.track_flips`, or since ``init``/``sparse``), and a
      last row ``{"path": "(all)", "status": "aggregate", "flip_rate": ...}`` the fraction over all
      sparse layers' entries. A model under the dense finish (``dense_products``) says so in
      ``note``; its statistics are those of the masks it would use when sparse.
    """
    fe = frontend(model)
    seen = fe.layers(model, variables, sample_args, sample_kwargs)
    if seen is not None and not any(x.sparse for x in seen):
        rows = [dict(path=x.path, kind=x.kind, kernel_shape=x.kernel_shape, status="skipped",
                     method="", note=x.note) for x in seen]
        if print_fn is not None:
            print_fn("no layer is sparse:\n" + format_table(rows))
        return rows
    cfg, records, kernels = read(model, variables)
    by_path = {"/".join(map(str, p)): p for p in records}
    flips = flip_state(cfg, records, kernels)[:2] if cfg.track_flips else None
    order = [x.path for x in seen or ()]
    order += sorted(p for p in by_path if p not in set(order))
    info = {x.path: x for x in seen or ()}
    rows = []
    for ps in order:
        x, p = info.get(ps), by_path.get(ps)
        row = dict(path=ps, kind=x.kind if x else None)
        if p is None:
            row.update(kernel_shape=x.kernel_shape, status="skipped", method="", note=x.note)
        else:
            method, stack, c = geometry(cfg, p, records[p], kernels[p])
            k = kernels[p][(0,) * len(stack)].size // c
            note = x.note if x else (effective_method(cfg, c, k)[1]
                                     or (search_method(cfg, c)[1] if method == "bimask" else ""))
            if "mask" in records[p]:
                note = "stored mask, recomputed at refresh" + (f"; {note}" if note else "")
            if cfg.dense_products:
                note = "dense products (dense finish)" + (f"; {note}" if note else "")
            fwd, bwd = record_masks(cfg, method, kernels[p], records[p])
            row.update(kernel_shape=tuple(kernels[p].shape), status="sparse", method=method,
                       note=note, **_stats(fwd, bwd, records[p]["perm"], method, cfg.n, cfg.m,
                                           cfg.k_order))
            if "sste_scale" in records[p]:
                sc = jax.device_get(records[p]["sste_scale"])
                row["sste_scale"] = float(sc) if sc.ndim == 0 else sc.tolist()
            if flips is not None:
                row["flip_rate"] = float(flips[0][p])
        rows.append(row)
    if flips is not None:
        rows.append(dict(path="(all)", kind=None, kernel_shape=None, status="aggregate",
                         method="", note="", flip_rate=float(flips[1])))
    if print_fn is not None:
        print_fn(format_table(rows))
    return rows


def export(model, variables=None):
    """Inference weights: every sparse kernel multiplied by its forward mask (the stored one of a
    ``mask_update="refresh"`` layer, as it computes with it; ``"sste"``: replaced by the weight
    the layer multiplies, ``sste_scale * S(kernel)``); a model under the dense
    finish (``dense_products``) exports its kernels unchanged, as it computes with them.

    Returns:
      linen: the variables without the ``"bimask"`` collection (``params`` has the unwrapped
      model's tree; load with ``unwrapped.apply(exported, x)``). nnx: an ``nnx.State`` of every
      variable except :class:`BimaskState`; load with ``nnx.update(unwrapped_model, exported)``.
    """
    cfg, records, kernels = read(model, variables)
    masked = {}
    for p, rec in records.items():
        method, stack, c = geometry(cfg, p, rec, kernels[p])
        if cfg.dense_products:
            continue
        if method == "sste":
            fn = functools.partial(sste_kernel, c=c, n=cfg.n, m=cfg.m, k_order=cfg.k_order)
            for _ in stack:
                fn = jax.vmap(fn)
            masked[p] = fn(kernels[p], rec["sste_scale"])
        elif method != "dense":
            fwd, _ = record_masks(cfg, method, kernels[p], rec)
            masked[p] = jnp.where(fwd, kernels[p], jnp.zeros((), kernels[p].dtype))
    return frontend(model).write_kernels(model, variables, masked)
