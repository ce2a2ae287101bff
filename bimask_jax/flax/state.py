"""Permutation refresh of a sparse model: pure functions from (model, variables) to new state.

Two ways to schedule it (paper: every 100 steps, first at step 0):

* from the host, between jitted train steps::

      if bimask_jax.refresh_due(step, 100):
          variables = {**variables, "bimask": refresh_jit(jax.random.fold_in(key, step), variables)}

  with ``refresh_jit = jax.jit(lambda k, v: bimask_jax.refresh(k, model, v))``;
* inside the jitted train step: ``new = bimask_jax.maybe_refresh(key, model, variables, step)``
  (a ``lax.cond`` on ``refresh_due(step, refresh_every)``; ``step`` may be a traced int).

For nnx models the result is an ``nnx.State`` of :class:`BimaskState` to apply with
``nnx.update(model, new_state)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bimask_jax.flax import linen as _linen
from bimask_jax.flax import nnx as _nnx
from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.layer import refresh_layers
from bimask_jax.flax.selection import effective_method


def is_linen(model) -> bool:
    return isinstance(model, _linen.Sparse)


def check_model(model) -> None:
    if not (is_linen(model) or isinstance(model, nnx.Module)):
        raise ValueError(
            "model must be the result of bimask_jax.sparse(...): a linen module it returned or an "
            f"nnx module it modified, got {type(model).__name__}"
        )


def config_of(model) -> SparseConfig | None:
    check_model(model)
    if is_linen(model):
        return model.config
    return _nnx.model_config(model)


def nnx_view(model, state=None):
    """The nnx model itself, or a clone updated with ``state`` (an ``nnx.State``) when given."""
    if state is None:
        return model
    view = nnx.clone(model)
    nnx.update(view, state)
    return view


def entries(model, variables=None) -> list[dict]:
    """Sparse layers, sorted by path: dicts with ``path`` (tuple), ``kernel`` (``(*stack, *kshape)``),
    ``perm`` (``(*stack, C)``), ``refreshes`` (``stack``), ``method`` (effective method)."""
    check_model(model)
    if is_linen(model):
        if variables is None:
            raise ValueError("variables are required for a linen model")
        out = _linen.layer_entries(model, variables)
        for e in out:
            e["method"] = effective_method(model.config, e["perm"].shape[-1])[0]
        return out
    view = nnx_view(model, variables)
    return [
        dict(path=path, kernel=layer.kernel[...], perm=op.perm[...], refreshes=op.refreshes[...],
             method=op.method)
        for path, layer, op in _nnx.sparse_ops(view)
    ]


def _write(model, variables, updates: dict):
    if is_linen(model):
        return _linen.write_state(variables, updates)
    view = nnx_view(model, variables)
    attr = {path: type(op) for path, _, op in _nnx.sparse_ops(view)}
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(view, _nnx.BimaskState)):
        path = tuple(path)
        layer_path, name = path[:-2], path[-1]
        if layer_path in updates and layer_path in attr and name in ("perm", "refreshes"):
            var = var.replace(updates[layer_path][0 if name == "perm" else 1])
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def _refresh_arrays(key, ents, cfg: SparseConfig):
    """``{path: (perm, refreshes)}`` after one refresh; pure in the arrays of ``ents``.

    Only ``"bimask"`` layers are searched (``dense``/``srste``/``transposable`` and srste fallbacks
    have no permutation); every layer's counter is incremented. Layer ``i`` of the searched ones,
    in sorted path order, uses ``fold_in(key, i)``.
    """
    searched = [e for e in ents if e["method"] == "bimask"]
    new = refresh_layers(key, [(e["kernel"], e["perm"]) for e in searched], cfg.n, cfg.m,
                         cfg.num_candidates, cfg.chunk_size, cfg.search, cfg.search_iterations)
    perms = {e["path"]: p for e, p in zip(searched, new, strict=True)}
    return {e["path"]: (perms.get(e["path"], e["perm"]), e["refreshes"] + 1) for e in ents}


def current_state(model, variables=None):
    """The model's Bi-Mask state as :func:`refresh` returns it (no search)."""
    check_model(model)
    if is_linen(model):
        return variables[_linen.COLLECTION]
    return nnx.state(nnx_view(model, variables), _nnx.BimaskState)


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
    """
    cfg = config_of(model)
    ents = entries(model, variables)
    if cfg is None or not ents:
        return current_state(model, variables)
    return _write(model, variables, _refresh_arrays(key, ents, cfg))


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
    cfg = config_of(model)
    every = refresh_every if refresh_every is not None else (cfg.refresh_every if cfg else 1)
    due = refresh_due(step, every)
    if isinstance(due, bool):
        return refresh(key, model, variables) if due else current_state(model, variables)
    ents = entries(model, variables)
    if cfg is None or not ents:
        return current_state(model, variables)
    arrays = [{k: e[k] for k in ("kernel", "perm", "refreshes")} for e in ents]
    static = [{k: e[k] for k in ("path", "method")} for e in ents]

    def run(key, arrays):
        return _refresh_arrays(key, [{**s, **a} for s, a in zip(static, arrays, strict=True)], cfg)

    def keep(key, arrays):
        return {s["path"]: (a["perm"], a["refreshes"]) for s, a in zip(static, arrays, strict=True)}

    updates = jax.lax.cond(due, run, keep, key, arrays)
    return _write(model, variables, updates)
