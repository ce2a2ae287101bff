"""The Bi-Mask state of a sparse model and its refresh: one representation for linen and nnx.

The state is ``{layer path tuple: record}`` (a record is the dict of :func:`new_record`), read
from and written back to the framework's own storage by the front end (:mod:`.linen`: the
``"bimask"`` collection; :mod:`.nnx`: :class:`BimaskState` variables). :func:`refresh_state` is
the one pure refresh over it; :func:`refresh` (from the host, between jitted steps, when
:func:`refresh_due`) and :func:`maybe_refresh` (inside a jitted step) wrap it for a model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bimask_jax.flax import linen as _linen
from bimask_jax.flax import nnx as _nnx
from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.layer import check_record, refresh_layers, safe_perm
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
    under ``jit`` where it cannot be checked, is replaced by the identity); every layer's
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
        cfg.n, cfg.m, cfg.num_candidates, cfg.chunk_size, cfg.search_iterations, cfg.k_order)
    out = {p: {**records[p], "refreshes": records[p]["refreshes"] + 1} for p in paths}
    for p, perm in zip(searched, new, strict=True):
        out[p]["perm"] = perm
    return out


def refresh(key, model, variables=None):
    """Runs ``search_permutation`` for every Bi-Mask layer with its current permutation as the
    incumbent (so a refresh never lowers a layer's retained count) and returns the new state.

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
      permutation search: ``srste``/``transposable``/``dense``/fallbacks keep their ``perm``).
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
