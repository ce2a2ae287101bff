"""Train a GPT-2-style language model with N:M sparsity (Bi-Mask, SR-STE, transposable, S-STE) or
dense, on one device or a ``(data, fsdp, model)`` device mesh.

    python train/lm.py --data tinyshakespeare.txt --preset gpt2-tiny --method bimask --run-dir runs/lm
    python train/lm.py --data owt/train.bin --preset gpt2-small --mesh 1,4,2 --dtype bfloat16 ...

Data: any UTF-8 text file (byte-level tokens, vocabulary 256) or a ``uint16`` ``.bin`` token file;
the last 10% validates (:mod:`train.text_data`). Model: :mod:`train.models.gpt`; every Linear of
attention and MLP is sparse, the embeddings and ``lm_head`` stay dense.

Parallelism (``--mesh D,F,M``): batch over ``data`` x ``fsdp``, parameters and AdamW moments sharded
over ``fsdp``, attention heads and the MLP hidden dimension over ``model`` (column-parallel ``qkv``
and ``up``, row-parallel ``out`` and ``down``), all stated as ``jax.sharding`` annotations; the
compiler inserts the collectives.

Bi-Mask under tensor parallelism (see train/LM.md):

* the masks of a sparse layer are computed where its kernel lives, with ``jax.shard_map`` over the
  layer's compute layout (no collective: a column-parallel layer's device sees its own columns and
  its own block of the permutation, a row-parallel layer's device its own rows and the whole
  permutation);
* a column-parallel layer's permutation is block-diagonal (``--perm-blocks`` blocks, default the
  ``model`` axis size), searched per block where the columns live
  (:func:`bimask_jax.blocked_permutation.search_blocked_permutation`); a row-parallel layer keeps a
  full-``C`` permutation: its rows are split, so only the candidates' scores are summed across
  devices (inserted by the compiler).

The masks go through the wrapper's hook: each sparse layer's :class:`~bimask_jax.flax.SparseOp`
(found with :func:`bimask_jax.flax.sparse_ops`) is replaced by :class:`ShardedSparseOp`, which
keeps its record (``perm``, ``refreshes``) and overrides ``masks``. The wrapper's refresh searches
whole permutations on whole kernels, so this script refreshes the permutations itself
(:func:`refresh_permutations`), and with ``--mask-update refresh`` (transposable: Hu et al.'s
periodic update) also the stored masks, sharded as the kernels are used, through ``masks``.

The methods after Bi-Mask (issue 17; flags and validation as in ``train/config.py``):
``--method sste``; ``--wgrad mvue`` (this step's MVUE keys written into the state before the
forward pass, ``train.loop.wgrad_step_key``); ``--dense-finish F`` (a second compiled step and
eval step with dense products, :func:`bimask_jax.with_dense_products`, from
:func:`dense_finish_start` on); ``--track-flips`` (:func:`track_flips`, the flip rates of the
masks of the ``masks`` hook, in the train records and a ``flips`` record per evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bimask_jax  # noqa: E402
from bimask_jax import flax as bflax  # noqa: E402
from bimask_jax.blocked_permutation import block_keys, search_blocked_permutation  # noqa: E402
from bimask_jax.masks import layer_masks  # noqa: E402
from bimask_jax.permutation import search_permutation  # noqa: E402
from train import text_data  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.config import RULES, add_method_options, check_method_options  # noqa: E402
from train.loop import _compile, wgrad_step_key  # noqa: E402
from train.models import gpt  # noqa: E402

MESH_AXES = ("data", "fsdp", "model")
DENSE_FINISH = RULES["dense_finish"]  # a float in [0, 1) (train/config.py's rule)

# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train/lm.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a GPT-2-style decoder with N:M sparsity (Bi-Mask, SR-STE, transposable) "
                    "or dense, on a (data, fsdp, model) device mesh.")
    g = p.add_argument_group("model and data")
    g.add_argument("--data", required=True, help="UTF-8 text file (byte tokens) or uint16 .bin")
    g.add_argument("--preset", default="gpt2-tiny", choices=sorted(gpt.PRESETS))
    g.add_argument("--block-size", type=int, default=None, help="context (default: the preset's)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="default: 256 for text, the preset's for .bin (must exceed every token)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (parameters and optimizer state stay float32)")
    g = p.add_argument_group("optimisation (AdamW, linear warm-up then cosine)")
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.1, help="on kernels and embeddings")
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global-norm clip (0: off)")
    g = p.add_argument_group("N:M sparsity")
    g.add_argument("--method", default="bimask",
                   choices=["dense", "srste", "transposable", "bimask", "sste"],
                   help="sste: S-STE (Hu et al., NeurIPS 2024), a continuous soft-threshold "
                        "pruning function with a per-layer scale fixed when the model is built, "
                        "straight-through gradients, no SR-STE decay")
    g.add_argument("--n", type=int, default=2)
    g.add_argument("--m", type=int, default=4)
    g.add_argument("--refresh-every", type=int, default=100, help="Bi-Mask: steps between searches")
    g.add_argument("--search", default="random", choices=["random", "stripe"],
                   help="Bi-Mask permutation search (random: the paper's)")
    g.add_argument("--num-candidates", type=int, default=100, help="random search: candidates")
    g.add_argument("--search-iterations", type=int, default=100, help="stripe: iterations")
    g.add_argument("--perm-blocks", type=int, default=None,
                   help="column-parallel layers: blocks of the block-diagonal permutation "
                        "(default: the model axis size; a multiple of it)")
    g.add_argument("--decay", type=float, default=2e-4, help="SR-STE decay on pruned weights")
    add_method_options(
        g, flips_logged="in the train records, per layer in a 'flips' record at every evaluation",
        refresh_steps="steps s %% --refresh-every == 0 (theirs: --refresh-every 40)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--mesh", default=None,
                   help="D,F,M sizes of the (data, fsdp, model) axes (default: all devices on data)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() first")
    g.add_argument("--coordinator-address", default=None)
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default=None, help="default runs/lm-<preset>-<method>")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true")
    g.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every this many steps")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--eval-every", type=int, default=250)
    g.add_argument("--eval-batches", type=int, default=20)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="checkpoint and exit after this step (simulates pre-emption)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--fast-compile", action="store_true",
                   help="compile without XLA backend optimisation (tests, smoke runs)")
    return p


def parse_mesh(text, n_devices: int) -> tuple[int, int, int]:
    """``"D,F,M"`` -> ``(D, F, M)``; None -> ``(n_devices, 1, 1)``. The product must equal the
    device count."""
    if text is None:
        return (n_devices, 1, 1)
    try:
        shape = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--mesh must be three integers D,F,M, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--mesh must be three positive integers D,F,M, got {text!r}")
    if math.prod(shape) != n_devices:
        raise ValueError(f"--mesh {text} has {math.prod(shape)} devices, but {n_devices} are "
                         "available")
    return shape


def check_flags(args) -> None:
    """Clear errors (ValueError naming the flag) for flag combinations the methods do not have,
    as ``train/config.py`` rejects them for the CNN scripts."""
    for name in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "refresh_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.n <= args.m:
        raise ValueError(f"--n/--m: N:M needs 0 < n <= m, got n={args.n}, m={args.m}")
    check_method_options(vars(args))
    try:  # the parser's rule, also for a Namespace built in code
        DENSE_FINISH(args.dense_finish)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--dense-finish: {e}") from None


def dense_finish_start(args) -> int | None:
    """The first dense training step (0-based) of ``--dense-finish`` over ``--steps``
    (:func:`bimask_jax.dense_finish_start`), or None when it is off (0, ``--method dense``, or a
    fraction that rounds to no step). Step ``i`` is dense when ``i >= start``; the state after
    ``s`` steps is evaluated dense when ``s > start``."""
    if not args.dense_finish or args.method == "dense":
        return None
    start = bimask_jax.dense_finish_start(args.steps, float(args.dense_finish))
    return start if start < args.steps else None


def make_mesh(shape, devices=None):
    devices = jax.devices() if devices is None else devices
    n = math.prod(shape)
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices[:n],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


# --------------------------------------------------------------------------------------------
# Sparse layers under tensor parallelism
# --------------------------------------------------------------------------------------------


class ShardedSparseOp(bflax.SparseOp):
    """The wrapper's :class:`~bimask_jax.flax.SparseOp` with the masks computed where the kernel
    lives (its :meth:`masks` hook; the record, refresh and summary are the wrapper's).

    ``role="column"``: the kernel is used as ``P(None, "model")``; device ``d`` computes the masks
    of its columns from its block of the (block-diagonal) permutation, shifted to local indices.
    ``role="row"``: the kernel is used as ``P("model", None)``; every device computes the masks of
    its rows with the whole permutation. Either way ``jax.shard_map`` runs :func:`layer_masks` on
    local data only: the masks need no communication. Bit-identical to the single-device masks
    (the column-parallel permutation is block-diagonal with blocks inside a device's columns).
    """

    def __init__(self, op: bflax.SparseOp, role: str, mesh, kernel):
        super().__init__(op.config, op.layer, op.conv, op.perm.shape[-1], op.perm.shape[:-1],
                         kernel=kernel)
        for name, value in op.record().items():
            getattr(self, name)[...] = value
        self.role = role
        self.mesh = mesh

    def masks(self, kernel, c: int, method: str, perm):
        cfg, role = self.config, self.role
        if kernel.ndim != 2 or kernel.shape[1] != c:
            raise ValueError(f"layer {self.layer.path!r}: ShardedSparseOp needs a (K, C) Linear "
                             f"kernel, got {tuple(kernel.shape)} with C={c}")
        spec = gpt.COMPUTE[role]

        def local(w, p):
            if role == "column":
                p = p - jax.lax.axis_index("model") * w.shape[1]
            return layer_masks(w, cfg.n, cfg.m, method, p if method == "bimask" else None,
                               k_order=cfg.k_order, checkify_perm=False)  # no effect in the step

        return jax.shard_map(
            local, mesh=self.mesh, in_specs=(spec, P("model") if role == "column" else P()),
            out_specs=(spec, spec), check_vma=False,
        )(jax.lax.stop_gradient(kernel), perm)


def perm_sharding(role: str):
    return P("model") if role == "column" else P()


def bimask_sharding(field: str, role: str):
    """The partition spec of a sparse layer's record field: its permutation by
    :func:`perm_sharding`, a stored kernel-shaped mask (``mask``: ``--mask-update refresh``;
    ``prev_fwd``: ``--track-flips``) as the kernel is used (``gpt.COMPUTE``), the rest
    (``refreshes``, S-STE's ``sste_scale``, the MVUE ``wgrad_key``) replicated."""
    if field == "perm":
        return perm_sharding(role)
    return gpt.COMPUTE[role] if field in ("mask", "prev_fwd") else P()


def build_model(args, gcfg: gpt.GPTConfig, mesh):
    """The GPT of ``gcfg`` (seeded by ``args.seed``) made sparse by ``bimask_jax.sparse`` with the
    masks moved to :class:`ShardedSparseOp` (``dense``: the plain model)."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    model = gpt.create(gcfg, seed=args.seed, mesh=mesh, dtype=dtype)
    if args.method == "dense":
        return model
    bimask_jax.sparse(model, n=args.n, m=args.m, method=args.method,
                      num_candidates=args.num_candidates, refresh_every=args.refresh_every,
                      decay=args.decay, exclude=gpt.DENSE_LAYERS, search=args.search,
                      search_iterations=args.search_iterations,
                      mask_update=getattr(args, "mask_update", "step"),
                      wgrad=getattr(args, "wgrad", "dense"),
                      track_flips=bool(getattr(args, "track_flips", False)))
    for _, layer, op in bflax.sparse_ops(model):
        layer.dot_general = nnx.data(ShardedSparseOp(op, layer.role, mesh, layer.kernel[...]))
    return model


def check_layout(args, gcfg: gpt.GPTConfig, mesh_shape, perm_blocks: int) -> None:
    """Clear errors for a mesh or permutation blocking the model cannot be laid out on."""
    d, f, mdl = mesh_shape
    if args.batch_size % (d * f):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by data x fsdp = {d * f}")
    if gcfg.n_head % mdl:
        raise ValueError(f"the model axis ({mdl}) must divide the number of heads ({gcfg.n_head})")
    if gcfg.vocab_size % mdl:
        raise ValueError(f"the model axis ({mdl}) must divide the vocabulary ({gcfg.vocab_size}); "
                         "pass --vocab-size")
    if gcfg.n_embd % f:
        raise ValueError(f"the fsdp axis ({f}) must divide n_embd ({gcfg.n_embd})")
    if args.method == "dense":
        return
    if perm_blocks < 1 or perm_blocks % mdl:
        raise ValueError(f"--perm-blocks {perm_blocks} must be a positive multiple of the model "
                         f"axis size {mdl}")
    for c in (3 * gcfg.n_embd, 4 * gcfg.n_embd):
        if c % (perm_blocks * args.m):
            raise ValueError(f"a column-parallel layer has {c} columns, not divisible into "
                             f"--perm-blocks {perm_blocks} blocks of a multiple of m={args.m}")
    if (4 * gcfg.n_embd // mdl) % args.m or gcfg.n_embd % args.m:
        raise ValueError(f"every device's rows of a row-parallel layer must be a multiple of "
                         f"m={args.m}")


def sparse_layers(model) -> list:
    """``(path, layer, op)`` of the sparse layers, sorted by path (empty for a dense model)."""
    return bflax.sparse_ops(model)


def refresh_permutations(model, key, due, args, perm_blocks: int, mesh) -> None:
    """When ``due`` (a traced bool), one permutation search for every Bi-Mask layer of ``model``
    (in place): layer ``i`` (sorted path order) uses ``fold_in(key, i)``; column-parallel layers
    search ``perm_blocks`` diagonal blocks (block ``b``: ``fold_in(fold_in(key, i), b)``) inside
    ``jax.shard_map`` over their columns, row-parallel layers the whole permutation with their
    rows split (the compiler sums the candidates' scores). Every layer's ``refreshes`` counts the
    due steps. The incumbent is the current permutation, so no refresh lowers a layer's score.
    A transposable layer that stores its mask (``--mask-update refresh``) gets it recomputed from
    its current kernel by its op's :meth:`ShardedSparseOp.masks` (where the kernel lives)."""
    layers = sparse_layers(model)
    if not layers:
        return
    n, m = args.n, args.m
    # checkify_perm=False: no effect in the step's graph (it would leave JAX's C++ dispatch path)
    kw = dict(method=args.search, num_candidates=args.num_candidates,
              iterations=args.search_iterations, checkify_perm=False)
    kernels = [jax.lax.stop_gradient(layer.kernel[...]) for _, layer, _ in layers]
    perms = [op.perm[...] for _, _, op in layers]

    def column_search(keys, w, p):
        off = jax.lax.axis_index("model") * w.shape[1]
        return search_blocked_permutation(keys, w, n, m, init=p - off, **kw) + off

    def search(key, kernels, perms):
        out = []
        for i, ((_, layer, op), w, p) in enumerate(zip(layers, kernels, perms, strict=True)):
            if op.layer.method != "bimask":
                out.append(p)
                continue
            k = jax.random.fold_in(key, i)
            if layer.role == "column":
                out.append(jax.shard_map(
                    column_search, mesh=mesh, in_specs=(P("model"), gpt.COMPUTE["column"],
                                                        P("model")),
                    out_specs=P("model"), check_vma=False)(block_keys(k, perm_blocks), w, p))
            else:
                w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, gpt.COMPUTE["row"]))
                out.append(search_permutation(k, w, n, m, args.num_candidates, init=p,
                                              method=args.search, iterations=args.search_iterations,
                                              checkify_perm=False))
        return out

    new = jax.lax.cond(due, search, lambda k, ws, ps: list(ps), key, kernels, perms)
    for (_, _, op), p in zip(layers, new, strict=True):
        op.perm[...] = p
        op.refreshes[...] = op.refreshes[...] + due.astype(jnp.int32)
    stored = [i for i, (_, _, op) in enumerate(layers) if "mask" in op.fields]
    if stored:
        def recompute(ws, olds):
            return [layers[i][2].masks(ws[i], ws[i].shape[-1], "transposable", perms[i])[0]
                    for i in stored]

        masks = jax.lax.cond(due, recompute, lambda ws, olds: list(olds), kernels,
                             [layers[i][2].mask[...] for i in stored])
        for i, mask in zip(stored, masks, strict=True):
            layers[i][2].mask[...] = mask


def track_flips(model) -> tuple[dict, jax.Array]:
    """``--track-flips``: the forward-mask flip rate (Hu et al., ICML 2024;
    :func:`bimask_jax.track_flips`) of every sparse layer of ``model`` between its record's
    ``prev_fwd`` and the mask of its current kernel, computed where the kernel is used (the op's
    :meth:`ShardedSparseOp.masks`, or the stored mask under ``--mask-update refresh``); then
    ``prev_fwd`` is set to that mask (in place). Equals :func:`bimask_jax.track_flips` (tests).

    Returns ``({layer path "a/b/c": float32 rate}, float32 aggregate)`` (aggregate: flipped entries
    over all entries of the sparse layers). The masks need no communication; the flipped counts
    are summed across devices (scalars), and the updated kernels are gathered over ``fsdp`` into
    their compute layout as the next forward pass does."""
    rates, flipped, total = {}, jnp.float32(0.0), 0
    for path, layer, op in sparse_layers(model):
        kernel = jax.lax.stop_gradient(layer.kernel[...])
        if "mask" in op.fields:  # --mask-update refresh: the stored transposable mask
            fwd = op.mask[...]
        else:
            fwd = op.masks(kernel, kernel.shape[-1], op.layer.method, op.perm[...])[0]
        diff = jnp.sum(fwd != op.prev_fwd[...], dtype=jnp.float32)
        rates["/".join(map(str, path))] = diff / fwd.size
        flipped, total = flipped + diff, total + fwd.size
        op.prev_fwd[...] = fwd
    return rates, flipped / max(total, 1)


# --------------------------------------------------------------------------------------------
# State, steps
# --------------------------------------------------------------------------------------------


def make_optimizer(args) -> tuple[optax.GradientTransformation, callable]:
    warm = min(args.warmup_steps, max(args.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(warm, 1) if warm else 0,
                                                  max(args.steps, warm + 1), args.min_lr)
    parts = [optax.clip_by_global_norm(args.clip_grad)] if args.clip_grad > 0 else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=args.beta2, eps=1e-8,
                             weight_decay=args.weight_decay,
                             mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    return optax.chain(*parts), schedule


def _names(path) -> tuple:
    return tuple(_key_name(k) for k in path)


def optimizer_shardings(tx, params, param_sh, replicated):
    """Shardings of ``tx.init(params)``: a leaf whose path ends with a parameter's path and has its
    shape (AdamW's moments) is sharded like that parameter (FSDP of the optimizer state); the
    rest (counters) is replicated."""
    by_path = {}
    for (path, x), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree_util.tree_flatten_with_path(param_sh)[0], strict=True):
        by_path[_names(path)] = (x.shape, sh)
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def pick(path, leaf):
        names = _names(path)
        for n in lengths:
            hit = by_path.get(names[-n:]) if len(names) >= n else None
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


class Trainer:
    """Everything of one run that does not change between steps: model graph, optimizer, mesh,
    shardings and the jitted steps. ``state`` is a plain dict pytree ``{"step", "params",
    "bimask", "opt", "rng"}`` (``params``/``bimask``: ``nnx.State``).

    ``--dense-finish``: ``dense_start`` is the first dense step (None: off); ``dense_graphdef``
    the same model with dense products (:func:`bimask_jax.with_dense_products`; same state), run
    by a second compiled step (:meth:`step_fn`) and eval step from the switch on."""

    def __init__(self, args, gcfg: gpt.GPTConfig, mesh):
        self.args, self.gcfg, self.mesh = args, gcfg, mesh
        check_flags(args)
        mesh_shape = tuple(mesh.shape[a] for a in MESH_AXES)
        self.perm_blocks = args.perm_blocks or mesh_shape[2]
        check_layout(args, gcfg, mesh_shape, self.perm_blocks)
        self.dense_start = dense_finish_start(args)
        model = build_model(args, gcfg, mesh)
        self.graphdef, params, bimask = nnx.split(model, nnx.Param, bimask_jax.BimaskState)
        self.dense_graphdef = None
        if self.dense_start is not None:
            bimask_jax.with_dense_products(model, True)
            self.dense_graphdef = nnx.split(model, nnx.Param, bimask_jax.BimaskState)[0]
            bimask_jax.with_dense_products(model, False)
        self.tx, self.schedule = make_optimizer(args)
        self.repl = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P(gpt.BATCH_AXES, None))
        param_sh = nnx.get_named_sharding(params, mesh)
        roles = {path: layer.role for path, layer, _ in sparse_layers(model)}
        bimask_sh = nnx.from_flat_state([
            (path, var.replace(NamedSharding(mesh, bimask_sharding(path[-1],
                                                                   roles[tuple(path[:-2])]))))
            for path, var in nnx.to_flat_state(bimask)])
        params = jax.device_put(params, param_sh)
        # one buffer per field: a new record may share an array between fields (prev_fwd is the
        # stored mask of --mask-update refresh), which the donating step would donate twice
        bimask = jax.device_put(jax.tree.map(jnp.copy, bimask), bimask_sh)
        opt_sh = optimizer_shardings(self.tx, params, param_sh, self.repl)
        opt = jax.jit(self.tx.init, out_shardings=opt_sh)(params)
        self.shardings = {"step": self.repl, "params": param_sh, "bimask": bimask_sh,
                          "opt": opt_sh, "rng": self.repl}
        self.init_state = {"step": jax.device_put(jnp.zeros((), jnp.int32), self.repl),
                           "params": params, "bimask": bimask, "opt": opt,
                           "rng": jax.device_put(jax.random.PRNGKey(args.seed), self.repl)}
        self.n_params = sum(int(x.size) for x in jax.tree.leaves(params))
        fast = args.fast_compile
        self.train_step = _compile(jax.jit(
            self._train_step, in_shardings=(self.shardings, self.batch_sharding),
            out_shardings=(self.shardings, self.repl), donate_argnums=0), fast=fast)
        self.eval_step = _compile(jax.jit(
            self._eval_loss, in_shardings=(self.shardings, self.batch_sharding),
            out_shardings=self.repl), fast=fast)
        if self.dense_start is not None:  # compiled at their first call (after the switch)
            self.dense_train_step = _compile(jax.jit(
                functools.partial(self._train_step, dense=True),
                in_shardings=(self.shardings, self.batch_sharding),
                out_shardings=(self.shardings, self.repl), donate_argnums=0), fast=fast)
            self.dense_eval_step = _compile(jax.jit(
                functools.partial(self._eval_loss, dense=True),
                in_shardings=(self.shardings, self.batch_sharding),
                out_shardings=self.repl), fast=fast)

    def is_dense(self, step: int) -> bool:
        """Whether training step ``step`` (0-based) is a dense-finish step."""
        return self.dense_start is not None and step >= self.dense_start

    def step_fn(self, step: int):
        """The compiled train step for training step ``step`` (0-based): sparse, or dense from
        ``dense_start`` on (also after a resume past it)."""
        return self.dense_train_step if self.is_dense(step) else self.train_step

    def eval_fn(self, done: int):
        """The compiled eval step of the state after ``done`` steps: dense once a step was."""
        return self.dense_eval_step if self.is_dense(done - 1) else self.eval_step

    def model(self, state, dense: bool = False):
        """The nnx model with ``state``'s parameters and permutations (for ``summary``);
        ``dense``: with dense products (the dense finish)."""
        return nnx.merge(self.dense_graphdef if dense else self.graphdef, state["params"],
                         state["bimask"])

    def refreshed(self, state):
        """``state["bimask"]`` after the refresh of ``state["step"]`` (when due)."""
        if self.args.method != "bimask" and getattr(self.args, "mask_update", "step") != "refresh":
            return state["bimask"]
        model = self.model(state)
        step = state["step"]
        key = jax.random.fold_in(jax.random.fold_in(state["rng"], step), 1)
        refresh_permutations(model, key, step % self.args.refresh_every == 0, self.args,
                             self.perm_blocks, self.mesh)
        return nnx.state(model, bimask_jax.BimaskState)

    def with_wgrad_keys(self, state, bimask):
        """``bimask`` with this step's MVUE keys (``--wgrad mvue``;
        :func:`bimask_jax.set_wgrad_key` with ``train.loop.wgrad_step_key(rng, step)``, as the CNN
        scripts); unchanged otherwise. The keys are replicated: every device draws its tokens'
        part of the same estimate (``jax_threefry_partitionable``)."""
        if self.args.method == "dense" or self.args.wgrad != "mvue":
            return bimask
        model = nnx.merge(self.graphdef, state["params"], bimask)
        return bimask_jax.set_wgrad_key(wgrad_step_key(state["rng"], state["step"]), model)

    def loss(self, params, bimask, batch, dense: bool = False):
        graphdef = self.dense_graphdef if dense else self.graphdef
        logits = nnx.merge(graphdef, params, bimask)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def _train_step(self, state, batch, dense: bool = False):
        """One optimizer step. Sparse: the refresh when due, this step's MVUE keys, forward and
        backward, the update, then (``--track-flips``) the flip rates of the updated kernels
        (metrics ``flip_rate``, ``flip_steps`` 1 and ``flip_layers``). ``dense``: the dense-finish
        step (dense products; no refresh, keys or flip tracking: flip metrics 0 with
        ``flip_steps`` 0)."""
        bimask = state["bimask"] if dense else self.with_wgrad_keys(state, self.refreshed(state))
        loss, grads = jax.value_and_grad(self.loss)(state["params"], bimask, batch, dense)
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "lr": self.schedule(state["step"]),
                   "grad_norm": optax.tree.norm(grads)}
        if self.args.method != "dense" and self.args.track_flips:
            model = nnx.merge(self.graphdef, params, bimask)
            if dense:
                rates = {"/".join(map(str, p)): jnp.float32(0.0) for p, _, _ in
                         sparse_layers(model)}
                metrics.update(flip_rate=jnp.float32(0.0), flip_steps=jnp.float32(0.0),
                               flip_layers=rates)
            else:
                rates, agg = track_flips(model)
                bimask = nnx.state(model, bimask_jax.BimaskState)
                metrics.update(flip_rate=agg, flip_steps=jnp.float32(1.0), flip_layers=rates)
        return {"step": state["step"] + 1, "params": params, "bimask": bimask, "opt": opt,
                "rng": state["rng"]}, metrics

    def grads(self, state, batch, dense: bool = False):
        """(loss, grads) of ``batch`` at ``state`` as its train step computes them: after its
        refresh and with its MVUE keys (sparse), or dense (tests)."""
        bimask = state["bimask"] if dense else self.with_wgrad_keys(state, self.refreshed(state))
        return jax.value_and_grad(self.loss)(state["params"], bimask, batch, dense)

    def masks(self, state) -> dict:
        """``{layer path: (fwd, bwd)}`` of every sparse layer, computed as the train step computes
        them (jit this; tests)."""
        out = {}
        for path, layer, op in sparse_layers(self.model(state)):
            c = layer.kernel.shape[-1]
            if "mask" in op.fields:  # --mask-update refresh: the stored transposable mask
                fwd = bwd = op.mask[...]
            else:
                fwd, bwd = op.masks(layer.kernel[...], c, op.layer.method, op.perm[...])
            out["/".join(map(str, path))] = (fwd, bwd)
        return out

    def _eval_loss(self, state, batch, dense: bool = False):
        return self.loss(state["params"], state["bimask"], batch, dense)

    def put_batch(self, local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local.items()}


# --------------------------------------------------------------------------------------------
# Checkpoints: the state as a flat {name: array} dict (orbax reshards on restore)
# --------------------------------------------------------------------------------------------


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten_state(state) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {".".join(_key_name(k) for k in path): x for path, x in leaves}


def unflatten_state(flat: dict, like):
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = [flat[".".join(_key_name(k) for k in path)] for path, _ in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def save_checkpoint(ckpt: Checkpointer, state, meta: dict) -> None:
    ckpt.save(int(state["step"]), flatten_state(state), meta)


def restore_checkpoint(ckpt: Checkpointer, like):
    """``(state, meta)`` of the latest checkpoint, laid out like ``like`` (any mesh)."""
    flat, meta = ckpt.restore(flatten_state(like))
    return unflatten_state(flat, like), meta


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def retained_fraction(trainer: Trainer, state) -> dict:
    """Mean backward-mask retained fraction and search efficacy over the Bi-Mask layers
    (``bimask_jax.summary``)."""
    rows = [r for r in bimask_jax.summary(trainer.model(state), print_fn=None)
            if r.get("status") == "sparse" and r.get("method") == "bimask"]
    if not rows:
        return {"retained": None, "efficacy": None}
    return {"retained": float(np.mean([r["bwd_retained"] for r in rows])),
            "efficacy": float(np.mean([r["efficacy"] for r in rows]))}


@dataclasses.dataclass
class FlipWindow:
    """``--track-flips`` between two evaluations: each step's per-layer flip rates, aggregate
    and sparse-step count (0 in the dense finish) summed on the device (:meth:`add`);
    :meth:`take` returns the means over the sparse steps and resets."""

    sums: dict | None = None

    def add(self, layers, aggregate, steps) -> None:
        if layers is None:
            return
        new = {"layers": layers, "agg": aggregate, "steps": steps}
        self.sums = new if self.sums is None else jax.tree.map(jnp.add, self.sums, new)

    def take(self) -> dict:
        """``{"flip_rate": mean aggregate per sparse step, "flip_rates": {layer: mean},
        "flip_steps": sparse steps}`` (rates None when no sparse step was tracked), then
        resets."""
        sums, self.sums = (None if self.sums is None else jax.device_get(self.sums)), None
        steps = 0 if sums is None else int(sums["steps"])
        if not steps:
            return {"flip_rate": None, "flip_rates": None, "flip_steps": steps}
        rates = {k: float(v) / steps for k, v in sums["layers"].items()}
        return {"flip_rate": float(sums["agg"]) / steps, "flip_rates": rates, "flip_steps": steps}


def evaluate(trainer: Trainer, state, val) -> float:
    """Mean validation loss over ``--eval-batches`` fixed batches (dense products once a
    dense-finish step was taken)."""
    args = trainer.args
    eval_step = trainer.eval_fn(int(state["step"]))
    total = 0.0
    for local in text_data.val_batches(val, seed=args.seed, num_batches=args.eval_batches,
                                       batch_size=args.batch_size,
                                       block_size=trainer.gcfg.block_size,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        total += float(eval_step(state, trainer.put_batch(local)))
    return total / max(args.eval_batches, 1)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.distributed:
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
    check_flags(args)
    tokens, data_vocab = text_data.load_tokens(args.data)
    is_bin = args.data.endswith(".bin")
    overrides = {}
    if args.block_size:
        overrides["block_size"] = args.block_size
    vocab = args.vocab_size or (gpt.PRESETS[args.preset].vocab_size if is_bin else
                                text_data.BYTE_VOCAB)
    if vocab < data_vocab:
        raise ValueError(f"--vocab-size {vocab} is smaller than the data's largest token + 1 "
                         f"({data_vocab})")
    gcfg = gpt.preset(args.preset, vocab_size=vocab, **overrides)
    train_tok, val_tok = text_data.split(tokens, gcfg.block_size)
    mesh = make_mesh(parse_mesh(args.mesh, jax.device_count()))
    run_dir = args.run_dir or os.path.join("runs", f"lm-{args.preset}-{args.method}")
    pidx = jax.process_index()
    from train.loop import Logger

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=args.keep_checkpoints)
    if args.resume and ckpt.latest_step() is None:
        raise ValueError(f"--resume: no checkpoint in {run_dir!r}")
    if not args.resume and ckpt.latest_step() is not None:
        raise ValueError(f"run dir {run_dir!r} already holds checkpoints: pass --resume or "
                         "choose another --run-dir")
    log = Logger(run_dir, progress=not args.no_progress, tensorboard=False, enabled=pidx == 0)
    trainer = Trainer(args, gcfg, mesh)
    state = trainer.init_state
    if args.resume:
        state, meta = restore_checkpoint(ckpt, state)
        log.print(f"resumed from step {int(state['step'])} (saved on mesh {meta.get('mesh')})")
    elif pidx == 0:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**vars(args), "model": dataclasses.asdict(gcfg)}, f, indent=1, default=str)
    mesh_shape = [int(mesh.shape[a]) for a in MESH_AXES]
    log.print(f"lm: {args.preset} ({trainer.n_params:,} params, {gcfg.n_layer} layers, "
              f"d={gcfg.n_embd}, ctx {gcfg.block_size}, vocab {gcfg.vocab_size}) "
              f"method={args.method} {args.n}:{args.m} on {args.data} ({len(train_tok):,} train / "
              f"{len(val_tok):,} val tokens); mesh (data, fsdp, model) = {tuple(mesh_shape)}, "
              f"{jax.process_count()} host(s); batch {args.batch_size} x {gcfg.block_size}; "
              f"run dir {run_dir}")
    if args.method != "dense" and pidx == 0:
        bimask_jax.summary(trainer.model(state), print_fn=log.print)

    def meta():
        return {"step": int(state["step"]), "mesh": mesh_shape, "method": args.method,
                "preset": args.preset, "seed": args.seed, "perm_blocks": trainer.perm_blocks,
                "wgrad": args.wgrad, "dense_finish": args.dense_finish,
                "dense_start": trainer.dense_start, "track_flips": args.track_flips}

    step = int(state["step"])
    t_start = time.time()
    t_log, n_timed, acc, compiled, val_loss, stopped = time.time(), 0, None, False, None, False
    n_acc = 0
    tokens_per_step = args.batch_size * gcfg.block_size
    flips = FlipWindow()
    while step < args.steps:
        local = text_data.batch_at(train_tok, seed=args.seed, step=step,
                                   batch_size=args.batch_size, block_size=gcfg.block_size,
                                   process_index=pidx, process_count=jax.process_count())
        if trainer.dense_start is not None and step == trainer.dense_start:
            log.record("dense_finish", step=step, steps=args.steps,
                       fraction=args.dense_finish)
            log.print(f"dense finish: steps {step}..{args.steps - 1} run dense products")
            compiled = False  # the dense step compiles now: leave it out of tokens/s
        state, metrics = trainer.step_fn(step)(state, trainer.put_batch(local))
        step += 1
        flips.add(metrics.pop("flip_layers", None), metrics.get("flip_rate"),
                  metrics.get("flip_steps"))
        acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
        n_acc += 1
        n_timed += 1
        if not compiled:  # tokens/s leaves out a step that compiled
            jax.block_until_ready(state)
            compiled, t_log, n_timed = True, time.time(), 0
        if step % args.log_every == 0 or step == args.steps:
            m = {k: float(v) for k, v in jax.device_get(acc).items()}
            mean = {k: v / n_acc for k, v in m.items()}
            dt = time.time() - t_log
            tps = n_timed * tokens_per_step / dt if n_timed else None
            extra = {}
            if "flip_steps" in m:  # mean aggregate flip rate of the window's sparse steps
                extra["flip_rate"] = (m["flip_rate"] / m["flip_steps"] if m["flip_steps"]
                                      else None)
            log.bar(0, 1, step, args.steps, loss=mean["loss"], lr=mean["lr"],
                    **({"tok/s": round(tps)} if tps else {}))
            log.record("train", step=step, loss=mean["loss"], lr=mean["lr"],
                       grad_norm=mean["grad_norm"], tokens_per_s=tps,
                       seconds=round(time.time() - t_start, 2), **extra,
                       **({"dense_finish": True} if trainer.is_dense(step - 1) else {}))
            t_log, n_timed, n_acc, acc = time.time(), 0, 0, None
        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.time()
            val_loss = evaluate(trainer, state, val_tok)
            log.record("eval", step=step, val_loss=val_loss,
                       **({"dense": True} if trainer.is_dense(step - 1) else {}))
            if args.method == "bimask":
                log.record("sparsity", step=step, **retained_fraction(trainer, state))
            if args.track_flips and args.method != "dense":
                log.record("flips", step=step, **flips.take())
            log.print(f"step {step}/{args.steps}: val loss {val_loss:.4f}")
            t_log += time.time() - t_eval  # evaluation time is not training time
        if args.stop_after_steps and step >= args.stop_after_steps and step < args.steps:
            save_checkpoint(ckpt, state, meta())
            stopped = True
            log.print(f"stopping after step {step} (--stop-after-steps)")
            break
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(ckpt, state, meta())
    ckpt.close()
    summary = {"preset": args.preset, "method": args.method, "n": args.n, "m": args.m,
               "search": args.search, "mask_update": args.mask_update, "wgrad": args.wgrad,
               "dense_finish": args.dense_finish, "dense_start": trainer.dense_start,
               "track_flips": args.track_flips, "step": step,
               "params": trainer.n_params,
               "final_val_loss": val_loss, "mesh": mesh_shape, "seed": args.seed,
               "seconds": round(time.time() - t_start, 1), "stopped_early": stopped,
               "run_dir": run_dir}
    if args.method != "dense" and not stopped:
        rows = bimask_jax.summary(trainer.model(state), print_fn=log.print)
        if pidx == 0:
            with open(os.path.join(run_dir, "sparsity.json"), "w") as f:
                json.dump(rows, f, indent=1, default=str)
    log.record("summary", **summary)
    log.print(f"SUMMARY {args.preset} method={args.method} step={step} val loss "
              f"{val_loss if val_loss is None else round(val_loss, 4)} {summary['seconds']}s")
    log.close()
    summary["state"] = state
    summary["trainer"] = trainer
    return summary


if __name__ == "__main__":
    main()
