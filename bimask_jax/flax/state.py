"""The Bi-Mask state of a sparse model and its refresh: one representation for linen and nnx.

The state is ``{layer path tuple: record}`` (a record is the dict of :func:`new_record`), read
from and written back to the framework's own storage by the front end (:mod:`.linen`: the
``"bimask"`` collection; :mod:`.nnx`: :class:`BimaskState` variables). :func:`refresh_state` is
the one pure refresh over it; :func:`refresh` (from the host, between jitted steps, when
:func:`refresh_due`) and :func:`maybe_refresh` (inside a jitted step) wrap it for a model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bimask_jax.flax import linen as _linen
from bimask_jax.flax import nnx as _nnx
from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.layer import (
    check_record,
    record_masks,
    refresh_layers,
    safe_perm,
    stacked_masks,
    stacked_sste_scales,
)
from bimask_jax.flax.selection import effective_method, search_method


def frontend(model):
    """The front-end module (:mod:`.linen` or :mod:`.nnx`) that stores ``model``'s state."""
    if isinstance(model, _linen.Sparse):
        return _linen
    if isinstance(model, nnx.Module):
        return _nnx
    raise ValueError(
        "model must be the result of bimask_jax.sparse(...): a linen module it returned or an "
        f"nnx module it modified, got {type(model).__name__}"
    )


def geometry(cfg: SparseConfig, path: tuple, record: dict, kernel) -> tuple[str, tuple, int]:
    """``(method, stack, C)`` of a sparse layer from its record and kernel ``(*stack, *kshape)``,
    after checking the record fits the kernel (:func:`check_record`; ValueError naming the layer).

    ``stack = perm.shape[:-1]`` and ``C = perm.shape[-1]`` must match the kernel: its leading axes
    equal ``stack`` and ``C`` is the product of some of its last axes, leaving at least one input
    axis. (Inside the products the check is exact: ``C`` is the layer's own output size.)
    """
    ps = "/".join(map(str, path))
    perm = record.get("perm")
    if perm is None or jnp.ndim(perm) < 1:
        raise ValueError(f"layer {ps!r}: Bi-Mask state needs a 'perm' of shape (*stack, C)")
    stack, c = tuple(jnp.shape(perm)[:-1]), jnp.shape(perm)[-1]
    ks = tuple(kernel.shape)
    inner = ks[len(stack):]
    outs = {math.prod(inner[j:]) for j in range(1, len(inner))}
    if ks[: len(stack)] != stack or c not in outs:
        raise ValueError(
            f"layer {ps!r}: Bi-Mask state 'perm' has shape {tuple(jnp.shape(perm))}, which does "
            f"not fit its kernel {ks}: it needs (*stack, C) with the kernel's stack axes and C the "
            f"size of its output axes (one of {sorted(outs)}); the state is from another model?"
        )
    method = effective_method(cfg, c, math.prod(inner) // c)[0]
    check_record(ps, record, cfg, method, ks, stack, c)
    return method, stack, c


def _key(path):
    return tuple(map(str, path))


def read(model, variables):
    """``(config, {path: record}, {path: kernel})`` of a sparse model's layers, checked."""
    fe = frontend(model)
    cfg = fe.config(model)
    records, kernels = fe.read(model, variables) if cfg is not None else ({}, {})
    if not records:
        raise ValueError(
            "no layer of this model has Bi-Mask state: "
            + ("pass the variables returned by model.init(...) of the bimask_jax.sparse model "
               "(init creates the 'bimask' collection, or raises saying why no layer can be sparse)"
               if fe is _linen else
               "it was not made sparse by bimask_jax.sparse (which raises, saying why per "
               "layer, when no layer can be sparse)")
        )
    for p in records:
        geometry(cfg, p, records[p], kernels[p])
    return cfg, records, kernels


def _method(cfg: SparseConfig, record: dict, kernel) -> str:
    """The effective method of a layer from its ``(*stack, C)`` perm and ``(*stack, *kshape)``
    kernel."""
    perm = record["perm"]
    k = math.prod(kernel.shape[perm.ndim - 1:]) // perm.shape[-1]
    return effective_method(cfg, perm.shape[-1], k)[0]


def refresh_state(key, cfg: SparseConfig, records: dict, kernels: dict) -> dict:
    """One refresh, pure in its arrays: ``search_permutation`` on every ``"bimask"`` layer with its
    current permutation as the incumbent (an incumbent that is not a permutation, possible only
    under ``jit`` where it cannot be checked, is replaced by the identity); every layer that
    stores its transposable mask (``mask_update="refresh"``) gets it recomputed from its current
    kernel (``optimal_transposable_mask``; Hu et al.'s periodic update); every layer's
    ``refreshes`` is incremented and its other fields kept. Layer ``i`` of the searched ones, in
    sorted path order, uses ``fold_in(key, i)`` (stacked layers a split of it).

    Args:
      records: ``{layer path tuple: record}``; kernels: ``{layer path tuple: kernel}``, with
        ``(*stack, *kshape)`` kernels and ``(*stack, C)`` perms (checked by :func:`geometry`).
    """
    paths = sorted(records, key=_key)
    searched = [p for p in paths if _method(cfg, records[p], kernels[p]) == "bimask"]
    new = refresh_layers(
        key, [(kernels[p], safe_perm(records[p]["perm"]),
               search_method(cfg, records[p]["perm"].shape[-1])[0]) for p in searched],
        cfg.n, cfg.m, cfg.num_candidates, cfg.chunk_size, cfg.search_iterations, cfg.k_order,
        cfg.keep_incumbent)
    out = {p: {**records[p], "refreshes": records[p]["refreshes"] + 1} for p in paths}
    for p, perm in zip(searched, new, strict=True):
        out[p]["perm"] = perm
    for p in paths:
        if "mask" in records[p]:  # a "transposable" layer with mask_update="refresh"
            out[p]["mask"] = stacked_masks(kernels[p], records[p]["perm"], cfg.n, cfg.m,
                                           "transposable", cfg.k_order)[0]
    return out


def refresh(key, model, variables=None):
    """Runs ``search_permutation`` for every Bi-Mask layer with its current permutation as the
    incumbent (so a refresh never lowers a layer's retained count, unless
    ``sparse(..., keep_incumbent=False)``, the reference's policy) and returns the new state.

    Args:
      key: PRNG key; layer ``i`` (in sorted path order) uses ``fold_in(key, i)``, stacked layers a
        split of it. Pass a fresh key per refresh, e.g. ``fold_in(key, step)``.
      model: a model from :func:`bimask_jax.sparse` (linen ``Sparse`` or the modified nnx model).
      variables: linen: the variables dict (``params`` and ``"bimask"`` are read). nnx: optional
        ``nnx.State`` to use instead of the model's own values.

    Returns:
      linen: the new ``"bimask"`` collection (use ``{**variables, "bimask": new}``). nnx: an
      ``nnx.State`` of :class:`BimaskState` (use ``nnx.update(model, new)``). Per layer ``perm`` is
      the best permutation found and ``refreshes`` is incremented (also for layers without a
      permutation search: ``srste``/``transposable``/``dense``/fallbacks keep their ``perm``); a
      transposable layer's stored ``mask`` (``mask_update="refresh"``) is recomputed.
      Pure: the same inputs give the same output, on every device.

    Raises:
      ValueError: a layer's state does not fit it (shape, or a concrete ``perm`` that is not a
        permutation), or no layer has state.
    """
    cfg, records, kernels = read(model, variables)
    return frontend(model).write_state(model, variables, refresh_state(key, cfg, records, kernels))


def refresh_due(step, refresh_every: int):
    """Whether a refresh is due at ``step``: ``step % refresh_every == 0`` (first at step 0).

    ``step``: Python int (returns bool) or int array, possibly traced (returns a bool array).
    """
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"refresh_every must be a Python int >= 1, got {refresh_every!r}")
    if isinstance(step, int) and not isinstance(step, bool):
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step % refresh_every == 0
    step = jnp.asarray(step)
    if not jnp.issubdtype(step.dtype, jnp.integer) or step.ndim != 0:
        raise ValueError(f"step must be an integer scalar, got {step.dtype}{step.shape}")
    return step % refresh_every == 0


def maybe_refresh(key, model, variables=None, step=0, *, refresh_every: int | None = None):
    """:func:`refresh` when ``refresh_due(step, refresh_every)``, else the current state.

    ``refresh_every`` defaults to the one given to :func:`bimask_jax.sparse`. With a Python int
    ``step`` the decision is taken in Python (no search is traced when not due); with an array
    ``step`` (e.g. inside a jitted train step) it is a ``lax.cond``, so the search runs only on due
    steps. The key is used as given: fold the step in yourself (``fold_in(key, step)``).
    """
    cfg, records, kernels = read(model, variables)
    due = refresh_due(step, refresh_every if refresh_every is not None else cfg.refresh_every)
    if isinstance(due, bool):
        new = refresh_state(key, cfg, records, kernels) if due else records
    else:
        paths = sorted(records, key=_key)  # a list: nnx paths may mix int and str keys

        def run(k, recs):
            out = refresh_state(k, cfg, dict(zip(paths, recs, strict=True)), kernels)
            return [out[p] for p in paths]

        recs = jax.lax.cond(due, run, lambda k, recs: recs, key, [records[p] for p in paths])
        new = dict(zip(paths, recs, strict=True))
    return frontend(model).write_state(model, variables, new)


# ----------------------------------------------------- per-step state of the methods after Bi-Mask


def _layer_keys(key, records: dict, field: str) -> dict:
    """``{path: uint32 (*stack, 2)}``: layer ``i`` (sorted path order, among the records holding
    ``field``) gets ``key_data(fold_in(key, i))``, a stacked layer a split of it over its stack."""
    out = {}
    paths = [p for p in sorted(records, key=_key) if field in records[p]]
    for i, p in enumerate(paths):
        shape = records[p][field].shape  # (*stack, 2)
        lk = jax.random.fold_in(key, i)
        size = math.prod(shape[:-1])
        ks = jax.random.split(lk, size) if shape[:-1] else lk
        data = jax.random.key_data(ks)
        if data.shape[-1:] != shape[-1:]:
            raise ValueError(f"key must be of the default PRNG implementation (key data of "
                             f"{shape[-1]} uint32 words), got key data of shape {data.shape}")
        out[p] = data.reshape(shape).astype(jnp.uint32)
    return out


def _as_key(key):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim:
            raise ValueError(f"key must be one PRNG key, got shape {key.shape}")
        return key
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"key must be a PRNG key (jax.random.key(...) or a uint32 (2,) PRNGKey), "
                         f"got {key.dtype}{tuple(key.shape)}")
    return jax.random.wrap_key_data(key)


def set_wgrad_key(key, model, variables=None):
    """This step's keys of the MVUE weight gradients (``sparse(..., wgrad="mvue")``).

    The key reaches the ops' ``custom_vjp`` as an array of the layer's record (``wgrad_key``), so
    it travels with the state like the permutation, in linen and nnx alike, under ``jit``, and is
    the same on every device of a mesh. Call this once per training step, before the forward
    pass, with a fresh key (e.g. ``fold_in(key, step)``); a key left unchanged repeats the same
    random draws (still unbiased each step, but correlated across steps). Pure.

    Args:
      key: PRNG key (``jax.random.key`` scalar or uint32 ``(2,)``; may be traced). Layer ``i`` of
        those with a ``wgrad_key``, in sorted path order, gets ``fold_in(key, i)``; a stacked layer
        a split of it over its stack.
      model, variables: as :func:`refresh`.

    Returns:
      linen: the new ``"bimask"`` collection; nnx: an ``nnx.State`` of :class:`BimaskState` (as
      :func:`refresh`).
    """
    cfg, records, kernels = read(model, variables)
    if cfg.wgrad != "mvue":
        raise ValueError(f"set_wgrad_key: the model was made sparse with wgrad={cfg.wgrad!r}; "
                         "per-step keys are for wgrad='mvue'")
    keys = _layer_keys(_as_key(key), records, "wgrad_key")
    new = {p: ({**r, "wgrad_key": keys[p]} if p in keys else r) for p, r in records.items()}
    return frontend(model).write_state(model, variables, new)


def flip_state(cfg: SparseConfig, records: dict, kernels: dict):
    """The flip rates (Hu et al., ICML 2024; :func:`bimask_jax.stability.flip_rate`) of every
    layer's forward mask between its record's ``prev_fwd`` and the mask it uses now (of its
    current kernel; the stored one under ``mask_update="refresh"``, which changes only at a
    refresh). Pure.

    Returns:
      ``(rates, aggregate, new_records)``: ``{path: float32 scalar}`` (the fraction of the layer's
      mask entries, all stacked layers together, whose keep/drop state changed), the float32
      fraction over all tracked layers' entries, and the records with ``prev_fwd`` set to the
      current masks.
    """
    if not cfg.track_flips:
        raise ValueError("flip rates need sparse(..., track_flips=True) (the previous mask is kept "
                         "in the state only then)")
    rates, new, flipped, total = {}, {}, jnp.float32(0.0), 0
    for p in sorted(records, key=_key):
        rec, kernel = records[p], kernels[p]
        method = geometry(cfg, p, rec, kernel)[0]
        fwd = record_masks(cfg, method, kernel, rec)[0]
        diff = jnp.sum(fwd != rec["prev_fwd"], dtype=jnp.float32)
        rates[p] = diff / fwd.size
        flipped, total = flipped + diff, total + fwd.size
        new[p] = {**rec, "prev_fwd": fwd}
    return rates, flipped / max(total, 1), new


def track_flips(model, variables=None):
    """Forward-mask flip rates since the last call, and the state that remembers the masks now.

    Call once per training step after the optimizer update (under ``jit`` too): the rates are
    between the masks of the kernels at the previous call (initially the kernels at ``init`` /
    ``sparse``) and the current kernels. Needs ``sparse(..., track_flips=True)``, which keeps one
    bool per kernel entry in the state (``prev_fwd``).

    Returns:
      ``(state, rates, aggregate)``: the new state (as :func:`refresh`: linen ``"bimask"``
      collection, nnx ``nnx.State``), ``{"a/b": float32 scalar}`` per sparse layer and the float32
      aggregate (flipped entries over all entries of the tracked layers).
    """
    cfg, records, kernels = read(model, variables)
    rates, agg, new = flip_state(cfg, records, kernels)
    rates = {"/".join(map(str, p)): r for p, r in rates.items()}
    return frontend(model).write_state(model, variables, new), rates, agg


def reset_sste_scales(model, variables=None):
    """The state with every S-STE layer's ``sste_scale`` recomputed from its current kernel
    (:func:`bimask_jax.sste.sste_scale`), e.g. after loading pretrained weights into a model whose
    state was created from its random initialization. Returns the state as :func:`refresh`."""
    cfg, records, kernels = read(model, variables)
    new = {}
    for p, rec in records.items():
        if "sste_scale" in rec:
            method, stack, c = geometry(cfg, p, rec, kernels[p])
            rec = {**rec, "sste_scale": stacked_sste_scales(kernels[p], c, cfg.n, cfg.m,
                                                            cfg.k_order, len(stack))}
        new[p] = rec
    return frontend(model).write_state(model, variables, new)


def with_dense_products(model, dense: bool = True):
    """The dense finish (Hu et al., ICML 2024: the last part of training dense): a model whose
    selected layers run the plain dense product of their raw kernels (``dense=True``) or the
    sparse one again (``False``), with the same parameters and state.

    linen: returns a new :class:`~bimask_jax.flax.linen.Sparse` with the same structure; its
    ``apply`` takes the same variables (the ``"bimask"`` state is still read, checked and kept,
    so a checkpoint and :func:`refresh`/:func:`summary` work unchanged). nnx: switches the model
    in place and returns it (a static attribute: an ``nnx.jit`` step retraces once). Which step is
    dense: :func:`bimask_jax.dense_finish.is_dense_step`.
    """
    if not isinstance(dense, bool):
        raise ValueError(f"dense must be a bool, got {dense!r}")
    fe = frontend(model)
    cfg = fe.config(model)
    if cfg is None:
        raise ValueError("the model was not made sparse by bimask_jax.sparse")
    new_cfg = dataclasses.replace(cfg, dense_products=dense)
    if fe is _linen:
        return model.clone(config=new_cfg)
    for _, _, op in _nnx._candidates(model):
        if op is not None:
            op.config = new_cfg
    return model
