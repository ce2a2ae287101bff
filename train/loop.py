"""The training loop shared by ``train/cifar.py``, ``train/imagenet.py`` and the quickstart.

Data parallel with ``jax.sharding``: one mesh axis ``"data"`` over every device of every host; the
train state is replicated and each global batch is sharded along its first axis (BatchNorm
statistics are therefore computed over the global batch, i.e. synchronised BN, unless
``--bn-groups R`` asks for PyTorch's per-GPU statistics over R consecutive slices). Multi-host runs
call ``jax.distributed.initialize()`` first (``--distributed``); each host reads its own rows.

The train state is a plain dict pytree::

    {"step": int32 (), "params": ..., "opt_state": ..., "model_state": {"batch_stats": ...,
     "bimask": ...}, "rng": uint32 (2,)}

Step ``s`` draws its randomness from ``fold_in(rng, s)``, so a run resumed at step ``s`` replays
the same random numbers as an unbroken one.

The one place that knows about N:M sparsity is :func:`sparsify` / :class:`SparseHooks` (the seam
to ``bimask_jax``'s wrapper); with ``method="dense"`` the plain module is trained. The methods
after Bi-Mask live in the same seam: ``--wgrad mvue`` sets the layers' MVUE keys
(:func:`wgrad_step_key`) in the step before the forward; ``--track-flips`` computes the flip
rates after the update (the previous masks are in the ``"bimask"`` collection, so checkpoints
carry them); ``--dense-finish`` switches to a second compiled step (and eval step) with dense
products from :func:`dense_finish_start` on, also after a resume past it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import config as config_lib
from train import data as data_lib
from train import xla_cpu
from train.checkpoint import Checkpointer, CorruptCheckpoint

# --------------------------------------------------------------------------------------------
# Data description handed to the loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataSpec:
    """What the loop needs of a dataset.

    ``train_source`` / ``eval_source``: sequences of ``(image or path, label)`` elements;
    ``train_transform(element, rng)`` and ``eval_transform(element)`` map one to
    ``{"image": uint8 (image_size, image_size, channels), "label", "valid"}``. ``mean`` / ``std``
    (per channel, on the 0..1 scale) normalise on the device.
    """

    train_source: Sequence
    eval_source: Sequence
    train_transform: Callable
    eval_transform: Callable
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""


# --------------------------------------------------------------------------------------------
# The sparsity seam
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SparseHooks:
    """How the loop talks to ``bimask_jax``: ``model`` is the module to init/apply;
    ``refresh(key, variables, step)`` returns the ``"bimask"`` collection to use for step
    ``step`` (0-based; a permutation search when due, else unchanged) or is None;
    ``summary`` / ``export`` take (model, variables).

    The methods after Bi-Mask (``--wgrad mvue``, ``--track-flips``, ``--dense-finish``):
    ``wgrad_key(key, variables)`` returns the ``"bimask"`` collection with this step's MVUE keys
    (None unless ``wgrad="mvue"``); ``flips(variables)`` returns ``(bimask collection, {layer:
    rate}, aggregate)``, the flip rates since its last call (None unless ``track_flips``);
    ``dense_model``: the same model with dense products (``bimask_jax.with_dense_products``: same
    variables), for the dense finish (None for ``method="dense"``)."""

    model: Any
    method: str
    refresh: Callable | None = None
    summary: Callable | None = None
    export: Callable | None = None
    wgrad_key: Callable | None = None
    flips: Callable | None = None
    dense_model: Any = None


def sparsify(module, cfg: argparse.Namespace, dense_layers: tuple[str, ...]) -> SparseHooks:
    """Wrap ``module`` for ``cfg.method`` with ``bimask_jax.sparse`` (``dense``: the plain module,
    same parameter tree).

    ``dense_layers``: regexes (``re.search`` on layer paths such as ``"layer1_0/conv2"``) of the
    layers kept dense (the model's exclusions); the wrapper also leaves depthwise convs and layers
    whose input channels (``k_order="hwi"``) or kernel size (``"ihw"``) do not fit M dense.
    Bi-Mask refreshes the permutations inside the jitted step at the steps :func:`refresh_steps`
    gives (``cfg.first_refresh``), and so does ``transposable`` with ``cfg.mask_update ==
    "refresh"`` its stored masks (Hu et al.'s periodic update: ``refresh_every=40``,
    ``first_refresh="start"``). ``cfg.wgrad``, ``cfg.track_flips`` and ``cfg.mask_update``
    (default ``"dense"``, False, ``"step"``) go to ``bimask_jax.sparse``."""
    if cfg.method == "dense":
        return SparseHooks(model=module, method="dense")
    import bimask_jax as api

    model = api.sparse(
        module, n=cfg.n, m=cfg.m, method=cfg.method, num_candidates=cfg.num_candidates,
        refresh_every=cfg.refresh_every, decay=cfg.decay, exclude=tuple(dense_layers),
        backend=cfg.kernels, search=cfg.search, search_iterations=cfg.search_iterations,
        k_order=getattr(cfg, "k_order", "hwi"),
        keep_incumbent=bool(getattr(cfg, "keep_incumbent", True)),
        wgrad=getattr(cfg, "wgrad", "dense"), track_flips=bool(getattr(cfg, "track_flips", False)),
        mask_update=getattr(cfg, "mask_update", "step"),
    )
    refresh = wgrad_key = flips = None
    if cfg.method == "bimask" or getattr(cfg, "mask_update", "step") == "refresh":
        shift = refresh_shift(getattr(cfg, "first_refresh", "start"))

        def refresh(key, variables, step):
            return api.maybe_refresh(key, model, variables, step + shift)
    if getattr(cfg, "wgrad", "dense") == "mvue":
        def wgrad_key(key, variables):
            return api.set_wgrad_key(key, model, variables)
    if getattr(cfg, "track_flips", False):
        def flips(variables):
            return api.track_flips(model, variables)
    return SparseHooks(model=model, method=cfg.method, refresh=refresh, summary=api.summary,
                       export=api.export, wgrad_key=wgrad_key, flips=flips,
                       dense_model=api.with_dense_products(model))


# The stream of the MVUE keys: step s uses fold_in(fold_in(rng, WGRAD_STREAM), s), apart from the
# step's other random numbers (fold_in(rng, s), split), which therefore do not change with --wgrad.
WGRAD_STREAM = 0x6D767565  # "mvue"


def wgrad_step_key(rng, step):
    """The MVUE key of training step ``step`` (0-based) of a run whose state rng is ``rng``."""
    return jax.random.fold_in(jax.random.fold_in(rng, WGRAD_STREAM), step)


def dense_finish_start(cfg, steps_per_epoch: int) -> int | None:
    """The first dense step (0-based) of ``--dense-finish`` over the run's ``epochs x
    steps_per_epoch`` steps (``bimask_jax.dense_finish_start``), or None when it is off (0, or a
    fraction that rounds to no step). Training step ``i`` is dense when ``i >= start``; the state
    after ``s`` steps is evaluated and exported dense when ``s > start`` (a step was dense)."""
    fraction = float(getattr(cfg, "dense_finish", 0.0) or 0.0)
    if fraction == 0.0 or cfg.method == "dense":
        return None
    import bimask_jax as api

    total = cfg.epochs * steps_per_epoch
    start = api.dense_finish_start(total, fraction)
    return start if start < total else None


def refresh_shift(first_refresh: str) -> int:
    """The offset added to the step before ``bimask_jax.maybe_refresh``'s ``step % I == 0`` test:
    0 for ``"start"`` (searches at steps 0, I, 2I, ...: the reference's CIFAR and DeiT scripts,
    whose layer counter is incremented after the step) and 1 for ``"end"`` (steps I-1, 2I-1, ...:
    the reference's imagenet.py increments it before the forward, so its first search is at step
    I-1 and the permutation is the identity until then)."""
    if first_refresh not in ("start", "end"):
        raise ValueError(f"first_refresh must be 'start' or 'end', got {first_refresh!r}")
    return 0 if first_refresh == "start" else 1


def refresh_steps(first_refresh: str, refresh_every: int, num_steps: int) -> list[int]:
    """The 0-based training steps below ``num_steps`` at which Bi-Mask searches."""
    shift = refresh_shift(first_refresh)
    return [s for s in range(num_steps) if (s + shift) % refresh_every == 0]


# --------------------------------------------------------------------------------------------
# Optimizer and schedules
# --------------------------------------------------------------------------------------------


def lr_schedule(cfg: argparse.Namespace, steps_per_epoch: int) -> Callable:
    """Step -> learning rate (``L = steps_per_epoch``, ``E = epochs``, ``W = warmup_epochs``, epoch
    ``e = step // L``):

    - ``cosine_step``: linear warm-up over ``W * L`` steps from ``warmup_lr`` (``warmup_lr + (lr -
      warmup_lr) (step + 1) / (W L)``), then cosine per step to ``min_lr`` at the end of ``E``.
    - ``cosine_epoch``: the same with the cosine's time rounded down to the epoch start (PyTorch's
      ``CosineAnnealingLR`` stepped per epoch; the reference's CIFAR script, W = 0).
    - ``imagenet_ref``: the reference's ``imagenet.py`` ``adjust_learning_rate`` ("cos"):
      ``min_lr + (lr - min_lr)/2 (1 + cos(pi (e - W) / (E - W)))`` per epoch (also during the
      warm-up, where ``e - W < 0``), times ``(1 + step) / (W L)`` while ``e < W``.
    - ``timm_epoch``: timm's ``CosineLRScheduler`` (``t_in_epochs=True``, ``warmup_t=W``,
      ``warmup_lr_init=warmup_lr``, ``lr_min=min_lr``, ``t_initial=E``) as DeiT's ``main.py``
      steps it (``lr_scheduler.step(epoch)`` after epoch ``epoch``): epoch ``e`` trains at
      ``f(max(e - 1, 0))``, ``f(t) = warmup_lr + t (lr - warmup_lr) / W`` for ``t < W``, else
      ``min_lr + (lr - min_lr)/2 (1 + cos(pi t / E))``.
    - ``constant``: ``lr`` after the warm-up of ``cosine_step``.
    """
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    base, low, start = cfg.lr, cfg.min_lr, cfg.warmup_lr
    w_ep, n_ep, spe = float(cfg.warmup_epochs), float(cfg.epochs), steps_per_epoch
    if cfg.lr_schedule == "imagenet_ref" and n_ep == w_ep:
        raise ValueError("lr_schedule imagenet_ref needs epochs != warmup_epochs (it divides by "
                         "their difference)")

    def cosine(t, span):
        frac = jnp.clip(t / max(span, 1e-12), 0.0, 1.0)
        return low + 0.5 * (base - low) * (1.0 + jnp.cos(jnp.pi * frac))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        epoch = jnp.floor(step / spe)
        if cfg.lr_schedule == "imagenet_ref":
            # cos(pi (e - W) / (E - W)) is taken as is for e < W (negative argument), as the
            # reference computes it.
            lr = low + 0.5 * (base - low) * (1.0 + jnp.cos(jnp.pi * (epoch - w_ep)
                                                            / (n_ep - w_ep)))
            if w_ep <= 0:
                return lr
            return jnp.where(epoch < w_ep, lr * (1.0 + step) / (w_ep * spe), lr)
        if cfg.lr_schedule == "timm_epoch":
            t = jnp.maximum(epoch - 1.0, 0.0)
            after = cosine(t, n_ep)
            if w_ep <= 0:
                return after
            return jnp.where(t < w_ep, start + t * (base - start) / w_ep, after)
        if cfg.lr_schedule == "constant":
            after = jnp.asarray(base, jnp.float32)
        else:
            t = jnp.floor(step / steps_per_epoch) * steps_per_epoch if (
                cfg.lr_schedule == "cosine_epoch") else step
            frac = jnp.clip((t - warm) / max(1, total - warm), 0.0, 1.0)
            after = low + 0.5 * (base - low) * (1.0 + jnp.cos(jnp.pi * frac))
        if warm == 0:
            return after
        during = start + (base - start) * (step + 1) / warm
        return jnp.where(step < warm, during, after)

    return schedule


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params, rule: str = "kernels") -> Any:
    """Which parameters get weight decay (a bool pytree like ``params``).

    ``rule="kernels"``: kernels (ndim >= 2) except the cls token and position embedding, i.e. no
    decay on BatchNorm/LayerNorm scales and offsets, biases, cls token, position embedding (timm's
    rule). ``rule="bn_name"``: every parameter whose "/"-joined path does not contain ``"bn"``,
    the reference CNN scripts' rule on PyTorch parameter names (with the reference networks'
    module names, ``train/models/ref_*.py``: BatchNorms named ``bn*`` are not decayed, the others
    (``downsample_1``, ``features_{i}``, ``shortcut_1``) and every bias are)."""
    if rule == "kernels":
        def keep(path, x):
            name = _path_name(path)
            return x.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name
    elif rule == "bn_name":
        def keep(path, x):
            return "bn" not in _path_name(path)
    else:
        raise ValueError(f"wd_rule must be 'bn_name' or 'kernels', got {rule!r}")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: argparse.Namespace, schedule: Callable) -> optax.GradientTransformation:
    """SGD (momentum, optional Nesterov, L2 weight decay added to the gradient as PyTorch does) or
    AdamW (decoupled decay), with decay on the parameters :func:`decay_mask` selects by
    ``cfg.wd_rule``; optional global-norm clip."""
    rule = getattr(cfg, "wd_rule", "kernels")
    mask = functools.partial(decay_mask, rule=rule)
    mask(())  # an unknown rule fails here, not inside the first update
    parts = [optax.clip_by_global_norm(cfg.clip_grad)] if cfg.clip_grad > 0 else []
    if cfg.optimizer == "sgd":
        parts += [optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                  optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=bool(cfg.nesterov))]
    elif cfg.optimizer == "adamw":
        parts += [optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                              mask=mask)]
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    return optax.chain(*parts)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def normalize(images: jnp.ndarray, mean, std, dtype=jnp.float32, offset=None) -> jnp.ndarray:
    """uint8 (B, H, W, C) -> (images/255 + offset - mean)/std in ``dtype``; ``offset``: float
    (B, C) added to every pixel of each image on the 0..1 scale (the PCA lighting noise,
    ``train.data.lighting_offset``), or None."""
    x = images.astype(jnp.float32) / 255.0
    if offset is not None:
        x = x + jnp.asarray(offset, jnp.float32)[:, None, None, :]
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def mix_batch(key, x, targets, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5):
    """timm-style batch mixing: with both alphas > 0 choose CutMix with probability
    ``switch_prob``, else Mixup; ``lam ~ Beta(alpha, alpha)``; the partner of row i is row B-1-i.

    ``x``: float (B, H, W, C); ``targets``: float (B, K) (already label-smoothed). CutMix pastes a
    box of area fraction ~1-lam and sets lam to the kept area fraction."""
    k_sw, k_lm, k_lc, k_box = jax.random.split(key, 4)
    b, h, w = x.shape[:3]
    x_f, t_f = x[::-1], targets[::-1]
    use_cut = (jax.random.uniform(k_sw) < switch_prob) if (mixup_alpha > 0 and cutmix_alpha > 0) \
        else jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_lm, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cut = jax.random.beta(k_lc, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    # CutMix box: side ratio sqrt(1 - lam), random centre, clipped to the image.
    cut = jnp.sqrt(1.0 - lam_cut)
    ch, cw = jax.random.uniform(k_box, (2,)) * jnp.array([h, w])
    top, bot = jnp.clip(ch - cut * h / 2, 0, h), jnp.clip(ch + cut * h / 2, 0, h)
    lef, rig = jnp.clip(cw - cut * w / 2, 0, w), jnp.clip(cw + cut * w / 2, 0, w)
    top, bot, lef, rig = (jnp.floor(v).astype(jnp.int32) for v in (top, bot, lef, rig))
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= top) & (rows < bot) & (cols >= lef) & (cols < rig)  # (H, W)
    lam_cut = 1.0 - jnp.sum(box) / (h * w)
    x_cut = jnp.where(box[None, :, :, None], x_f, x)
    x_mix = lam_mix * x + (1.0 - lam_mix) * x_f
    lam = jnp.where(use_cut, lam_cut, lam_mix)
    x_out = jnp.where(use_cut, x_cut, x_mix)
    return x_out.astype(x.dtype), lam * targets + (1.0 - lam) * t_f


def _apply(model, variables, x, train, mutable, rngs=None):
    if mutable:
        return model.apply(variables, x, train=train, mutable=mutable, rngs=rngs)
    return model.apply(variables, x, train=train, rngs=rngs), {}


def make_train_step(hooks: SparseHooks, tx, schedule, cfg, data: DataSpec, mutable: list[str],
                    *, dense: bool = False):
    """(state, batch) -> (state, metrics sums) for one optimizer step; ``batch`` holds "image"
    uint8 (B, H, W, C), "label" int32 (B,), "valid" bool (B,) (rows with valid=False carry no
    loss).

    Sparse steps, in order: the Bi-Mask refresh when due, this step's MVUE keys
    (:func:`wgrad_step_key`), forward/backward, the optimizer update, then the flip rates of the
    updated kernels (metrics ``flip_rate`` (sum of the per-step aggregates), ``flip_steps`` and
    ``flip_layers`` ``{layer: rate}``). ``dense=True``: the dense-finish step (``hooks.dense_model``:
    dense products, no refresh, no keys, no flip tracking; with ``--track-flips`` its flip metrics
    are zeros with ``flip_steps`` 0, so the sums of a log window spanning the switch stay
    aligned)."""
    model, k = (hooks.dense_model if dense else hooks.model), data.num_classes
    refresh = None if dense else hooks.refresh
    wgrad_key = None if dense else hooks.wgrad_key
    flips = None if dense else hooks.flips
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    mixing = cfg.mixup > 0 or cfg.cutmix > 0

    def step_fn(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        k_drop, k_mix, k_post = jax.random.split(key, 3)
        valid = batch["valid"].astype(jnp.float32)
        x = normalize(batch["image"], data.mean, data.std, dtype, batch.get("lighting"))
        y = optax.smooth_labels(jax.nn.one_hot(batch["label"], k), cfg.label_smoothing)
        if mixing:
            x, y = mix_batch(k_mix, x, y, cfg.mixup, cfg.cutmix)
        ms = state["model_state"]
        if refresh is not None:
            ms = {**ms, "bimask": refresh(k_post, {"params": state["params"], **ms},
                                          state["step"])}
        if wgrad_key is not None:
            ms = {**ms, "bimask": wgrad_key(wgrad_step_key(state["rng"], state["step"]),
                                            {"params": state["params"], **ms})}

        def loss_fn(params):
            logits, updates = _apply(model, {"params": params, **ms}, x, True, mutable,
                                     {"dropout": k_drop})
            ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), y)
            loss = jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        upd, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], upd)
        new_ms = {**ms, **updates}
        step = state["step"] + 1
        n = jnp.sum(valid)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid)
        metrics = {"loss": loss * n, "correct": correct, "count": n,
                   "invalid": jnp.sum(1.0 - valid), "lr": schedule(state["step"])}
        if flips is not None:
            bimask, rates, agg = flips({"params": params, **new_ms})
            new_ms = {**new_ms, "bimask": bimask}
            metrics.update(flip_rate=agg, flip_steps=jnp.float32(1.0), flip_layers=rates)
        elif hooks.flips is not None:  # the dense finish of a --track-flips run
            _, rates, _ = jax.eval_shape(hooks.flips, {"params": params, **new_ms})
            metrics.update(flip_rate=jnp.float32(0.0), flip_steps=jnp.float32(0.0),
                           flip_layers={p: jnp.float32(0.0) for p in rates})
        new_state = {"step": step, "params": params, "opt_state": opt_state,
                     "model_state": new_ms, "rng": state["rng"]}
        return new_state, metrics

    return step_fn


def make_eval_step(hooks: SparseHooks, cfg, data: DataSpec, *, dense: bool = False):
    """(state, batch) -> sums of loss, top-1 and top-5 hits (top-min(5, K)) and valid rows;
    ``dense``: with ``hooks.dense_model`` (the dense finish)."""
    model, k = (hooks.dense_model if dense else hooks.model), data.num_classes
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    topk = min(5, k)

    def eval_fn(state, batch):
        valid = batch["valid"].astype(jnp.float32)
        x = normalize(batch["image"], data.mean, data.std, dtype)
        logits = model.apply({"params": state["params"], **state["model_state"]}, x, train=False)
        logits = logits.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        _, idx = jax.lax.top_k(logits, topk)
        hit = idx == batch["label"][:, None]
        return {"loss": jnp.sum(ce * valid), "top1": jnp.sum(hit[:, 0] * valid),
                "top5": jnp.sum(jnp.any(hit, -1) * valid), "count": jnp.sum(valid)}

    return eval_fn


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class Logger:
    """Progress bar (stderr), metrics JSONL (``<run>/metrics.jsonl``) and optional TensorBoard;
    only process 0 writes."""

    def __init__(self, run_dir: str, *, progress: bool, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.progress = progress and enabled
        self.tty = sys.stderr.isatty()
        self.tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError as e:
                    raise RuntimeError("--tensorboard needs tensorboardX: pip install tensorboardX") from e
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def record(self, kind: str, **values) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                 for k, v in values.items()}  # strict JSON: NaN (no timed step yet) -> null
        self.jsonl.write(json.dumps({"type": kind, **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            step = values.get("step", 0)
            for key, v in values.items():
                if isinstance(v, (int, float)) and np.isfinite(v) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{kind}/{key}", v, step)

    def bar(self, epoch: int, epochs: int, done: int, total: int, **vals) -> None:
        if not self.progress:
            return
        width = 24
        fill = int(width * done / max(total, 1))
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in vals.items())
        line = f"epoch {epoch + 1}/{epochs} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {text}"
        if self.tty:
            sys.stderr.write("\r" + line[:200] + " " * 4)
            if done == total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def print(self, text: str) -> None:
        if self.enabled:
            if self.tty and self.progress:
                sys.stderr.write("\r")
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def init_distributed(cfg: argparse.Namespace) -> None:
    """``jax.distributed.initialize()`` when ``--distributed``: with ``--coordinator-address``,
    ``--num-processes``, ``--process-id`` when given, else cluster auto-detection (SLURM, Open
    MPI, Cloud TPU, ``JAX_COORDINATOR_ADDRESS``)."""
    if getattr(cfg, "distributed", False):
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id)


FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compile(jitted, *, fast: bool, options: dict | None = None):
    """``jitted`` compiled at its first call; ``fast``: with ``FAST_COMPILE`` XLA options (far
    quicker compiles, slower code: for one-off programs, smoke runs and tests); ``options``:
    further per-compilation XLA options (``train.xla_cpu.compiler_options``)."""
    opts = {**(FAST_COMPILE if fast else {}), **(options or {})}
    if not opts:
        return jitted
    exe = None

    def call(*args):
        nonlocal exe
        if exe is None:
            exe = jitted.lower(*args).compile(opts)
        return exe(*args)

    return call


def _conv_options(cfg) -> dict:
    """Per-compilation XLA options of ``--xla-cpu-conv`` (``train.xla_cpu``; empty off CPU)."""
    return xla_cpu.compiler_options(xla_cpu.choose(getattr(cfg, "xla_cpu_conv", "auto")))


def _global_batch(local: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def _to_py(tree) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def evaluate(eval_step, state, data: DataSpec, cfg, sharding) -> dict:
    """Top-1 / top-5 accuracy (percent) and mean loss over the whole eval set."""
    batches = data_lib.eval_batches(
        data.eval_source, data.eval_transform, global_batch=cfg.eval_batch_size,
        image_size=data.image_size, channels=data.channels,
        process_index=jax.process_index(), process_count=jax.process_count(),
        workers=cfg.workers, prefetch=cfg.prefetch)
    total = None
    for local in batches:
        out = eval_step(state, _global_batch(local, sharding))
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    t = _to_py(total)
    n = max(t["count"], 1.0)
    return {"top1": 100.0 * t["top1"] / n, "top5": 100.0 * t["top5"] / n, "loss": t["loss"] / n,
            "count": int(t["count"])}


def _write_config(run_dir: str, cfg) -> None:
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(vars(cfg), f, indent=1, default=str)


def _export(hooks: SparseHooks, module, variables, run_dir: str, cfg, data: DataSpec, *,
            rows_sharding) -> float | None:
    """Save ``bimask_jax.export`` (the unwrapped model's variables, every sparse kernel times its
    forward mask) to ``<run_dir>/export`` (orbax); with ``--eval-export`` evaluate those weights
    with the plain module and return their top-1 (equal to the sparse model's, up to float
    rounding)."""
    import orbax.checkpoint as ocp

    exported = hooks.export(hooks.model, variables)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.path.join(run_dir, "export")), exported, force=True)
    if not cfg.eval_export:
        return None
    plain = SparseHooks(model=module, method="dense")
    rest = {k: v for k, v in exported.items() if k != "params"}
    ev = _compile(jax.jit(make_eval_step(plain, cfg, data)), fast=cfg.fast_compile,
                  options=_conv_options(cfg))
    return evaluate(ev, {"params": exported["params"], "model_state": rest}, data, cfg,
                    rows_sharding)["top1"]


def _mean_sparsity(hooks: SparseHooks, state) -> dict:
    """Mean over the Bi-Mask layers of the backward mask's retained fraction and of the search
    efficacy (``bimask_jax.summary``), for the per-epoch ``sparsity`` line of metrics.jsonl."""
    variables = {"params": state["params"], **state["model_state"]}
    rows = [r for r in hooks.summary(hooks.model, variables, print_fn=None)
            if r.get("status") == "sparse" and r.get("method") == "bimask"]
    if not rows:
        return {"retained": None, "efficacy": None}
    return {"retained": float(np.mean([r["bwd_retained"] for r in rows])),
            "efficacy": float(np.mean([r["efficacy"] for r in rows]))}


def default_run_dir(script: str, cfg) -> str:
    return os.path.join("runs", f"{script}-{cfg.arch}-{cfg.method}")


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why (the scripts print it as the last line)."""


class NonFiniteError(TrainError):
    """The loss or the train state became NaN/inf; nothing non-finite was checkpointed."""


def _sample(data: DataSpec):
    return jnp.zeros((1, data.image_size, data.image_size, data.channels), jnp.float32)


def check_sparse_layers(module, cfg, dense_layers: Sequence[str], data: DataSpec) -> list[str]:
    """Paths of the layers that ``bimask_jax.sparse`` makes N:M sparse for ``cfg`` (its own
    selection rule, ``bimask_jax.layers``: traced abstractly, no compute). ValueError listing every
    layer and why when none can be (e.g. ``--m 3`` or ``--m 64`` on a small model)."""
    import bimask_jax as api

    model = sparsify(module, cfg, dense_layers).model
    layers = api.layers(model, sample_args=(_sample(data),), sample_kwargs={"train": False})
    ok = [x.path for x in layers if x.sparse]
    if not ok:
        why = [f"{x.path}: " + ("kept dense by the model's exclusions" if x.note == "excluded"
                                else x.note) for x in layers]
        raise ValueError(
            f"--n/--m {cfg.n}:{cfg.m}: no layer of --arch {cfg.arch} can be N:M sparse (a sparse "
            f"layer needs its input channels, or with --k-order ihw its kernel size, divisible by "
            f"m); per layer:\n  " + "\n  ".join(why))
    return ok


@jax.jit
def _finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree) -> bool:
    """Whether every float array of ``tree`` is finite (one compiled reduction per structure)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_finite(leaves)) if leaves else True


@dataclasses.dataclass
class Run:
    """Everything one training run holds between :func:`setup`, :func:`train_epoch` and
    :func:`finish`: configuration, data, model hooks, compiled steps, the train state and the
    data position (``epoch``, ``batch_in_epoch``: the next batch to read)."""

    cfg: argparse.Namespace
    script: str
    module: Any
    data: DataSpec
    hooks: SparseHooks
    log: Logger
    ckpt: Checkpointer
    spe: int
    repl: Any
    rows: Any
    train_step: Callable
    eval_step: Callable
    state: Any
    n_params: int
    epoch: int = 0
    batch_in_epoch: int = 0
    best_top1: float = -1.0
    last_eval: dict | None = None
    skipped_total: int = 0
    stopped: bool = False
    finished: bool = False
    compiled: bool = False
    t_start: float = 0.0
    dense_start: int | None = None
    dense_train_step: Callable | None = None
    dense_eval_step: Callable | None = None
    dense_logged: bool = False
    flip_sums: dict | None = None
    flip_steps: int = 0
    flip_agg: float = 0.0

    def take_flip_rates(self) -> dict:
        """``--track-flips``: over the sparse steps since the last call (the epoch's, or from the
        resume on), the mean per-step flip rate of each layer (``flip_rates``, ``{layer: rate}``)
        and of the aggregate (``flip_rate``: flipped entries over all tracked entries), and their
        number (``flip_steps``; 0 in the dense finish, rates None); then resets. Empty without
        flip tracking."""
        if self.hooks.flips is None:
            return {}
        sums, agg, steps = self.flip_sums, self.flip_agg, self.flip_steps
        self.flip_sums, self.flip_agg, self.flip_steps = None, 0.0, 0
        if sums is None or steps == 0:
            return {"flip_rate": None, "flip_rates": None, "flip_steps": steps}
        rates = {k: float(v) / steps for k, v in jax.device_get(sums).items()}
        return {"flip_rate": agg / steps, "flip_rates": rates, "flip_steps": steps}

    def dense_after(self, steps_done: int) -> bool:
        """Whether the state after ``steps_done`` steps is in the dense finish (a dense step was
        taken): its eval, summary and export use the dense model."""
        return self.dense_start is not None and steps_done > self.dense_start

    def step_fn(self, step: int) -> Callable:
        """The compiled train step for 0-based step ``step`` (the dense one from
        ``dense_start`` on); records the switch in metrics.jsonl the first time it is taken."""
        if self.dense_start is None or step < self.dense_start:
            return self.train_step
        if not self.dense_logged:
            self.dense_logged = True
            self.compiled = False  # img/s leaves out the dense step's compilation too
            total = self.cfg.epochs * self.spe
            if step == self.dense_start:
                self.log.record("dense_finish", step=self.dense_start,
                                epoch=self.dense_start // self.spe + 1,
                                dense_steps=total - self.dense_start)
                self.log.print(f"dense finish: steps {self.dense_start + 1}-{total} of {total} "
                               "train dense (no masks, no refreshes)")
            else:
                self.log.print(f"resumed in the dense finish (dense since step "
                               f"{self.dense_start + 1} of {total})")
        return self.dense_train_step

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir

    def meta(self, epoch: int, batch: int) -> dict:
        return {"epoch": epoch, "batch_in_epoch": batch, "step": int(self.state["step"]),
                "steps_per_epoch": self.spe, "best_top1": self.best_top1, "arch": self.cfg.arch,
                "method": self.cfg.method, "seed": self.cfg.seed, "last_eval": self.last_eval,
                "stopped": self.stopped, "config": config_lib.training_settings(self.cfg)}

    def check_finite(self, where: str) -> None:
        """NonFiniteError unless every float array of the train state is finite."""
        if not _all_finite(self.state):
            raise NonFiniteError(
                f"the train state has NaN/inf values at step {int(self.state['step'])} ({where}): "
                f"stopping without saving it; {self.last_checkpoint()}. Lower --lr or check the "
                "data.")

    def last_checkpoint(self) -> str:
        step = self.ckpt.latest_step()
        return ("no checkpoint was written" if step is None else
                f"the newest checkpoint (step {step}) holds the last finite state")

    def save(self, epoch: int, batch: int, *, best: bool = False) -> None:
        self.check_finite("before a checkpoint")
        self.ckpt.save(epoch * self.spe + batch, self.state, self.meta(epoch, batch), best=best)

    def close(self) -> None:
        self.ckpt.close()
        self.log.close()


def _stored_settings(run_dir: str, meta: dict) -> dict | None:
    """The training settings a checkpoint was written with: its ``meta["config"]``, else (older
    checkpoints) the run's ``config.json``; None when neither exists."""
    if "config" in meta:
        return meta["config"]
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return config_lib.training_settings(json.load(f))
    return None


def check_resume_config(cfg, meta: dict, step: int) -> dict:
    """``{key: (checkpoint value, this run's value)}`` of the differing training settings that
    ``cfg.resume_override`` accepts; ValueError listing them when any other differs."""
    stored = _stored_settings(cfg.run_dir, meta)
    if stored is None:
        return {}
    current = config_lib.training_settings(cfg)
    overrides = tuple(getattr(cfg, "resume_override", ()) or ())
    unknown = sorted(set(overrides) - set(current))
    if unknown:
        raise ValueError(f"--resume-override: {unknown} are not training settings (they are: "
                         f"{', '.join(sorted(current))})")
    diff = config_lib.differences(stored, current)
    refused = {k: v for k, v in diff.items() if k not in overrides}
    if refused:
        lines = "\n  ".join(f"--{k.replace('_', '-')}: {a!r} in the checkpoint, {b!r} now"
                            for k, (a, b) in refused.items())
        raise ValueError(
            f"--resume: this run's settings differ from those of checkpoint {step} in "
            f"{cfg.run_dir}:\n  {lines}\nresume with the same flags, or accept the change with "
            f"--resume-override {','.join(refused)}")
    return {k: v for k, v in diff.items() if k in overrides}


def setup(cfg: argparse.Namespace, module, dense_layers: Sequence[str], data: DataSpec,
          *, script: str = "train") -> Run:
    """Check the configuration against the devices, data and model, build the optimizer, the
    steps and the initial train state, or restore and check it (``--resume``)."""
    cfg = argparse.Namespace(**{**vars(cfg), "run_dir": cfg.run_dir or default_run_dir(script, cfg)})
    run_dir = cfg.run_dir
    devices = jax.devices()
    for name in ("batch_size", "eval_batch_size"):
        b = getattr(cfg, name)
        if b % len(devices):
            raise ValueError(f"--{name.replace('_', '-')} {b} is not divisible by the device count "
                             f"{len(devices)}: every device needs the same number of rows")
    spe = data_lib.steps_per_epoch(len(data.train_source), cfg.batch_size)
    if spe == 0:
        raise ValueError(f"the training set has {len(data.train_source)} images, fewer than one "
                         f"batch of {cfg.batch_size}")
    if cfg.method != "dense":
        check_sparse_layers(module, cfg, dense_layers, data)
    # Auto axis: classic GSPMD propagation (jax.make_mesh defaults to Explicit sharding-in-types,
    # which every op inside the model would then have to support).
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)
    repl, rows_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.keep_checkpoints)
    log = None
    try:
        if cfg.resume and ckpt.latest_step() is None:
            raise ValueError(f"--resume: no checkpoint in {run_dir!r}")
        if not cfg.resume and ckpt.latest_step() is not None:
            raise ValueError(f"run dir {run_dir!r} already holds checkpoints: pass --resume to "
                             "continue that run, or choose another --run-dir")
        log = Logger(run_dir, progress=not cfg.no_progress, tensorboard=cfg.tensorboard,
                     enabled=jax.process_index() == 0)
        hooks = sparsify(module, cfg, dense_layers)
        schedule = lr_schedule(cfg, spe)
        tx = make_optimizer(cfg, schedule)
        key = jax.random.PRNGKey(cfg.seed)
        k_init, k_train = jax.random.split(key)
        sample = _sample(data)

        def init_fn():
            variables = dict(hooks.model.init({"params": k_init, "dropout": k_init}, sample,
                                              train=False))
            params = variables.pop("params")
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": tx.init(params), "model_state": variables, "rng": k_train}

        # Initialisation runs once: compile it without backend optimisation (XLA:CPU spends tens
        # of seconds optimising the unrolled threefry of every initializer otherwise).
        conv_opts = _conv_options(cfg)
        state = _compile(jax.jit(init_fn, out_shardings=repl), fast=True, options=conv_opts)()
        mutable = [c for c in state["model_state"] if c != "bimask"]
        train_step = _compile(jax.jit(make_train_step(hooks, tx, schedule, cfg, data, mutable),
                                      in_shardings=(repl, rows_sh), out_shardings=(repl, repl),
                                      donate_argnums=0), fast=cfg.fast_compile, options=conv_opts)
        eval_step = _compile(jax.jit(make_eval_step(hooks, cfg, data), in_shardings=(repl, rows_sh),
                                     out_shardings=repl), fast=cfg.fast_compile, options=conv_opts)
        dense_start = dense_finish_start(cfg, spe)
        dense_train = dense_eval = None
        if dense_start is not None:  # compiled at their first call, i.e. only when reached
            dense_train = _compile(jax.jit(
                make_train_step(hooks, tx, schedule, cfg, data, mutable, dense=True),
                in_shardings=(repl, rows_sh), out_shardings=(repl, repl), donate_argnums=0),
                fast=cfg.fast_compile, options=conv_opts)
            dense_eval = _compile(jax.jit(make_eval_step(hooks, cfg, data, dense=True),
                                          in_shardings=(repl, rows_sh), out_shardings=repl),
                                  fast=cfg.fast_compile, options=conv_opts)
        r = Run(cfg=cfg, script=script, module=module, data=data, hooks=hooks, log=log, ckpt=ckpt,
                spe=spe, repl=repl, rows=rows_sh, train_step=train_step, eval_step=eval_step,
                state=state, n_params=sum(int(np.prod(x.shape))
                                          for x in jax.tree.leaves(state["params"])),
                dense_start=dense_start, dense_train_step=dense_train, dense_eval_step=dense_eval)
        if cfg.resume:
            _resume(r)
        elif jax.process_index() == 0:
            _write_config(run_dir, cfg)
        return r
    except BaseException:
        ckpt.close()
        if log is not None:
            log.close()
        raise


def _resume(r: Run) -> None:
    """Restore the newest checkpoint that verifies into ``r`` after checking that this run's
    training settings equal the checkpoint's (or are accepted by ``--resume-override``); record
    the resume in metrics.jsonl and rewrite config.json with the settings now in force."""
    cfg, latest = r.cfg, r.ckpt.latest_step()
    try:  # settings first: a changed --width-mult is reported as such, not as a shape error
        check_resume_config(cfg, r.ckpt.read_meta(latest), latest)
    except CorruptCheckpoint:
        pass  # restore() reports it and falls back
    r.state, meta = r.ckpt.restore(r.state, report=r.log.print)
    step = meta["restored_from"]
    overrides = check_resume_config(cfg, meta, step)
    if meta.get("steps_per_epoch") != r.spe:
        raise ValueError(f"--resume: the checkpoint has {meta.get('steps_per_epoch')} steps per "
                         f"epoch, this run {r.spe} (different data or batch size)")
    r.epoch, r.batch_in_epoch = int(meta["epoch"]), int(meta["batch_in_epoch"])
    r.best_top1 = float(meta.get("best_top1", -1.0))
    r.last_eval = meta.get("last_eval")
    r.finished = r.epoch >= cfg.epochs and not meta.get("stopped", False)
    if r.finished:
        r.log.print(f"the run in {cfg.run_dir} is already finished ({r.epoch} epochs, step "
                    f"{int(r.state['step'])}): nothing to do (pass --epochs with "
                    "--resume-override epochs to train on)")
        return
    r.log.record("resume", step=int(r.state["step"]), checkpoint=step,
                 overrides={k: {"checkpoint": a, "now": b} for k, (a, b) in overrides.items()},
                 skipped_corrupt=meta["skipped_corrupt"])
    if jax.process_index() == 0:
        _write_config(cfg.run_dir, cfg)
    r.log.print(f"resumed from step {int(r.state['step'])} (epoch {r.epoch + 1}, batch "
                f"{r.batch_in_epoch})" + (f"; settings changed: {sorted(overrides)}"
                                          if overrides else ""))


def train_epoch(r: Run) -> None:
    """Train from ``(r.epoch, r.batch_in_epoch)`` to the end of the epoch (or to
    ``--stop-after-steps``), logging every ``--log-every`` steps (a non-finite loss stops the
    run), then evaluate when due and checkpoint."""
    cfg, spe, log, pidx = r.cfg, r.spe, r.log, jax.process_index()
    epoch = r.epoch
    batches = data_lib.train_batches(
        r.data.train_source, r.data.train_transform, global_batch=cfg.batch_size, seed=cfg.seed,
        epoch=epoch, start_batch=r.batch_in_epoch, process_index=pidx,
        process_count=jax.process_count(), workers=cfg.workers, prefetch=cfg.prefetch,
        repeats=cfg.repeated_aug)
    acc_m, t_log, n_log, n_timed, step = None, time.time(), 0, 0, r.batch_in_epoch
    for b, local in enumerate(batches, start=r.batch_in_epoch):
        r.state, metrics = r.step_fn(epoch * spe + b)(r.state, _global_batch(local, r.rows))
        layers = metrics.pop("flip_layers", None)
        if layers is not None:  # per-layer flip rates: summed over the epoch (sparsity line)
            r.flip_sums = layers if r.flip_sums is None else jax.tree.map(jnp.add, r.flip_sums,
                                                                           layers)
        acc_m = metrics if acc_m is None else jax.tree.map(jnp.add, acc_m, metrics)
        n_log += 1
        n_timed += 1
        step = b + 1
        if not r.compiled:  # img/s leaves out the first step of the run (compilation)
            jax.block_until_ready(r.state)
            r.compiled, t_log, n_timed = True, time.time(), 0
        global_step = epoch * spe + step
        if step % cfg.log_every == 0 or step == spe:
            m = _to_py(acc_m)
            dt = time.time() - t_log
            speed = n_timed * cfg.batch_size / dt if n_timed else float("nan")
            vals = {"loss": m["loss"] / max(m["count"], 1), "acc": 100 * m["correct"] / max(
                m["count"], 1), "lr": m["lr"] / n_log, "img_per_s": speed}
            if "flip_steps" in m:  # mean aggregate flip rate of the window's sparse steps
                r.flip_steps += int(m["flip_steps"])
                r.flip_agg += m["flip_rate"]
                vals["flip_rate"] = (m["flip_rate"] / m["flip_steps"] if m["flip_steps"]
                                     else None)
            r.skipped_total += int(m["invalid"])
            log.bar(epoch, cfg.epochs, step, spe, loss=vals["loss"], acc=vals["acc"],
                    lr=vals["lr"], **{"img/s": round(vals["img_per_s"], 1)})
            log.record("train", step=int(global_step), epoch=epoch + 1, **vals,
                       skipped=int(m["invalid"]))
            if not np.isfinite(vals["loss"]):
                raise NonFiniteError(
                    f"non-finite training loss ({vals['loss']}) in steps {global_step - n_log + 1}"
                    f"-{global_step} (epoch {epoch + 1}, lr {vals['lr']:.4g}): stopping; "
                    f"{r.last_checkpoint()}. Lower --lr or check the data.")
            acc_m, t_log, n_log, n_timed = None, time.time(), 0, 0
        if cfg.stop_after_steps and global_step >= cfg.stop_after_steps:
            r.stopped = True
            log.print(f"stopping after step {global_step} (--stop-after-steps)")
            if step < spe:  # mid-epoch: checkpoint here (at an epoch end: eval + save below)
                r.save(epoch, step)
                return
            break
        if cfg.ckpt_every_steps and global_step % cfg.ckpt_every_steps == 0 and step < spe:
            r.save(epoch, step)
    r.epoch, r.batch_in_epoch = epoch + 1, 0
    epoch = r.epoch
    r.check_finite("at the end of an epoch")
    is_best = False
    if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
        dense = r.dense_after(epoch * spe)
        r.last_eval = evaluate(r.dense_eval_step if dense else r.eval_step, r.state, r.data, cfg,
                               r.rows)
        is_best = r.last_eval["top1"] > r.best_top1
        r.best_top1 = max(r.best_top1, r.last_eval["top1"])
        log.record("eval", step=int(epoch * spe), epoch=epoch, **r.last_eval,
                   **({"dense_finish": True} if dense else {}))
        if r.hooks.summary is not None and (r.hooks.method == "bimask"
                                            or r.hooks.flips is not None):
            log.record("sparsity", step=int(epoch * spe), epoch=epoch,
                       **_mean_sparsity(r.hooks, r.state), **r.take_flip_rates())
        log.print(f"epoch {epoch}/{cfg.epochs}: val top-1 {r.last_eval['top1']:.2f}% "
                  f"top-5 {r.last_eval['top5']:.2f}% loss {r.last_eval['loss']:.4f} "
                  f"(best top-1 {r.best_top1:.2f}%)")
    r.save(epoch, 0, best=is_best)


def _summary(r: Run) -> dict:
    return {
        "arch": r.cfg.arch, "method": r.cfg.method, "n": r.cfg.n, "m": r.cfg.m,
        "wgrad": getattr(r.cfg, "wgrad", "dense"),
        "mask_update": getattr(r.cfg, "mask_update", "step"), "dense_from_step": r.dense_start,
        "epochs_done": r.epoch, "step": int(r.state["step"]), "params": r.n_params,
        "final_top1": r.last_eval["top1"] if r.last_eval else None,
        "final_top5": r.last_eval["top5"] if r.last_eval else None,
        "best_top1": r.best_top1 if r.best_top1 >= 0 else None,
    }


def finish(r: Run) -> dict:
    """Summary, sparsity.json and export (sparse methods, unless stopped early); the ``summary``
    line of metrics.jsonl; returns the summary with ``state`` and ``hooks`` added. After a dense
    finish the summary notes it and the export holds the raw (unmasked) kernels the model then
    computes with (``bimask_jax.export`` of the dense-products model)."""
    cfg, log = r.cfg, r.log
    r.ckpt.wait()
    variables = {"params": r.state["params"], **r.state["model_state"]}
    export_top1 = None
    if r.hooks.summary is not None and not r.stopped:
        dense = r.dense_after(int(r.state["step"]))
        hooks = (dataclasses.replace(r.hooks, model=r.hooks.dense_model) if dense else r.hooks)
        rows = hooks.summary(hooks.model, variables, print_fn=log.print,
                             sample_args=(_sample(r.data),), sample_kwargs={"train": False})
        if jax.process_index() == 0:
            with open(os.path.join(r.run_dir, "sparsity.json"), "w") as f:
                json.dump(rows, f, indent=1, default=str)
        export_top1 = _export(hooks, r.module, variables, r.run_dir, cfg, r.data,
                              rows_sharding=r.rows)
    summary = {**_summary(r), "export_top1": export_top1, "skipped_images": r.skipped_total,
               "seconds": round(time.time() - r.t_start, 1), "stopped_early": r.stopped,
               "run_dir": r.run_dir}
    log.record("summary", **summary)
    top1 = "n/a" if summary["final_top1"] is None else f"{summary['final_top1']:.2f}%"
    best = "n/a" if summary["best_top1"] is None else f"{summary['best_top1']:.2f}%"
    extra = "".join([" wgrad=mvue" if summary["wgrad"] == "mvue" else "",
                     " mask_update=refresh" if summary["mask_update"] == "refresh" else "",
                     f" dense from step {r.dense_start + 1}" if r.dense_start is not None else ""])
    log.print(f"SUMMARY {cfg.arch} method={cfg.method} {cfg.n}:{cfg.m}{extra} epochs={r.epoch} "
              f"step={summary['step']} final top-1 {top1} best top-1 {best} "
              f"skipped {r.skipped_total} images, {summary['seconds']}s, run dir {r.run_dir}")
    return {**summary, "state": r.state, "hooks": r.hooks}


def run(cfg: argparse.Namespace, module, dense_layers: tuple[str, ...], data: DataSpec,
        *, script: str = "train") -> dict:
    """Train ``module`` on ``data`` as ``cfg`` says (:func:`setup`, :func:`train_epoch` per
    epoch, :func:`finish`); returns the summary dict (also the last line of ``metrics.jsonl``)
    with the final ``state`` and ``hooks``. Checkpoints go to ``<run_dir>/checkpoints``. A
    ``--resume`` of a finished run trains nothing, writes nothing and returns the checkpoint's
    state with ``already_finished=True``."""
    r = setup(cfg, module, dense_layers, data, script=script)
    try:
        if r.finished:
            return {**_summary(r), "already_finished": True, "run_dir": r.run_dir,
                    "state": r.state, "hooks": r.hooks}
        data = r.data
        r.log.print(xla_cpu.choose(getattr(r.cfg, "xla_cpu_conv", "auto")).describe())
        r.log.print(
            f"{script}: {r.cfg.arch} ({r.n_params:,} params) method={r.cfg.method} "
            f"{r.cfg.n}:{r.cfg.m} on {data.name} ({len(data.train_source)} train / "
            f"{len(data.eval_source)} eval, {data.num_classes} classes); {jax.device_count()} "
            f"device(s), {jax.process_count()} host(s); batch {r.cfg.batch_size}, {r.spe} "
            f"steps/epoch, {r.cfg.epochs} epochs; run dir {r.run_dir}")
        r.t_start = time.time()
        while r.epoch < r.cfg.epochs and not r.stopped:
            train_epoch(r)
        return finish(r)
    finally:
        r.close()


def cli(main: Callable, prog: str) -> None:
    """Run ``main()`` as a command: a configuration, data or checkpoint problem (ValueError) or
    a run that cannot go on (:class:`TrainError`) ends with the reason as the last line of stderr
    and exit code 2 or 1 (no traceback; set ``BIMASK_TRACEBACK=1`` for one)."""
    try:
        main()
    except (ValueError, TrainError) as e:
        if os.environ.get("BIMASK_TRACEBACK"):
            raise
        sys.stderr.flush()
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2 if isinstance(e, ValueError) else 1) from None
