"""Options of :func:`bimask_jax.sparse`, validated once and shared by the linen and nnx front ends."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from bimask_jax._checks import K_ORDERS, check_nm
from bimask_jax.local_search import STRIPE_MAX_M
from bimask_jax.masked_products import WGRADS
from bimask_jax.masks import METHODS
from bimask_jax.permutation import SEARCH_METHODS

# How a "transposable" layer's mask follows its kernel: recomputed at every call ("step") or stored
# in the state and recomputed only by the refresh ("refresh": Hu et al.'s periodic update).
MASK_UPDATES = ("step", "refresh")

# "pallas" routes products to the 2:4 kernels (sparse_dense/sparse_conv(backend="pallas")).
BACKENDS = ("xla", "pallas")

# A layer filter: regex pattern(s) searched in the layer path ("block1/conv2"), or a predicate
# ``(path: str, module) -> bool``.
LayerFilter = str | Sequence[str] | Callable[[str, Any], bool] | None


def _normalize_filter(name: str, value) -> str | tuple[str, ...] | Callable | None:
    """Returns None, a tuple of compiled-checked regex strings, or a callable."""
    if value is None:
        return None
    if callable(value):
        return value
    patterns = (value,) if isinstance(value, str) else tuple(value)
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(
                f"{name} must be a regex string, a sequence of regex strings or a predicate "
                f"(path, module) -> bool, got an element {p!r}"
            )
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{name} pattern {p!r} is not a valid regex: {e}") from None
    return patterns


def filter_matches(flt, path: str, module) -> bool:
    """True when ``path`` (``"a/b/c"``) matches a normalized filter (see :class:`SparseConfig`)."""
    if callable(flt):
        return bool(flt(path, module))
    return any(re.search(p, path) for p in flt)


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """How a model is made sparse. Hashable (Flax keeps it as a static module attribute).

    Attributes:
      n, m: the N:M ratio (Python ints, ``1 <= n <= m``).
      method: ``"dense"``, ``"srste"``, ``"transposable"``, ``"bimask"`` or ``"sste"`` (S-STE, Hu et
        al., NeurIPS 2024: the layer multiplies ``scale * S(w)``, the soft-thresholded kernel of
        :mod:`bimask_jax.sste` with its per-layer ``scale`` fixed when the state is created,
        straight-through gradient, no SR-STE decay whatever ``decay`` is).
      num_candidates: random permutations tried per layer at each refresh (paper: 100).
      refresh_every: refresh period in training steps (paper: 100; first refresh at step 0).
      decay: SR-STE coefficient of ``decay * (1 - Mf) * W`` in the kernel gradient.
      exclude, include: layer filters on the layer path (regex string(s), searched with
        ``re.search``, or a predicate ``(path, module) -> bool``). ``include=None`` means every layer.
      backend: ``"xla"`` or ``"pallas"`` (Dense/DenseGeneral products through the 2:4 Pallas
        kernels; conv layers fall back to ``"xla"`` unless ``sparse_conv`` supports the backend).
      chunk_size: candidates scored per vmapped chunk in ``search_permutation`` (None: its default).
      search: ``search_permutation`` method: ``"random"`` (the paper's, ``num_candidates`` random
        permutations) or a local search of :mod:`bimask_jax.local_search` (``"stripe"``,
        ``"swap"``: ``search_iterations`` iterations from the current permutation). Default
        ``"auto"``: ``"stripe"`` when ``m <= 6``, else ``"random"`` -- at ResNet-50 and DeiT-S
        shapes stripe-100 keeps 1.5-3.7 points more of the forward mask than random-100 in less
        than half its time (BENCHMARKS.md, ``benchmarks/search.py``).
        ``num_candidates=0`` turns every search off (the no-permutation ablation). A layer whose
        groups straddle rows (``k_order="ihw"``, ``C % m != 0``) is searched with ``"random"``
        whatever ``search`` is (the local searches need ``C % m == 0``; ``summary`` notes it).
      k_order: how a conv kernel ``(*window, Cin, C)`` is read as the ``(K, C)`` matrix whose
        groups the masks take (``bimask_jax.masks``). ``"hwi"`` (default): ``Cin`` fastest, forward
        groups along ``Cin`` at each tap (what an NHWC 2:4 conv kernel needs). ``"ihw"``: the
        reference implementation's (PyTorch's ``(Cin, kh, kw)`` flatten): groups of ``m``
        consecutive entries of the flattened kernel, straddling output channels (forward) or rows
        (backward) when ``K % m`` or ``C % m`` is not 0, so a layer needs only ``K * C % m == 0``
        (the 3-channel stems become sparse, as in the reference). Dense layers read the same.
      keep_incumbent: refresh policy of the ``"random"`` search: ``True`` (default) keeps a layer's
        current permutation unless a candidate is strictly better (a refresh never lowers its
        score); ``False`` takes the best of the fresh candidates, as the reference code does (only
        with ``search="random"``; ``"auto"`` then means ``"random"``).
      wgrad: ``"dense"`` or ``"mvue"`` (any method): the weight-gradient product of every sparse
        layer uses the unbiased N:M estimate of the output gradient along the token axis (Chmiel
        et al., ICLR 2023; ``sparse_dense(wgrad="mvue")``), with this config's ``n:m`` (``n <= 2``)
        and the layer's ``wgrad_key`` record field as its key: set a fresh one every step with
        :func:`bimask_jax.flax.state.set_wgrad_key`.
      track_flips: keep each layer's forward mask of the last :func:`~bimask_jax.flax.state.track_flips`
        call in the record (``prev_fwd``, one bool per kernel entry), so that ``track_flips`` and
        ``summary`` report the flip rate (Hu et al., ICML 2024).
      mask_update: ``"step"`` (default) or ``"refresh"`` (only with ``method="transposable"``): Hu
        et al.'s (ICML 2024) periodic transposable mask update. Each transposable layer keeps its
        mask in the state (``mask``, one bool per kernel entry, initially the mask of the initial
        kernel), uses it for the forward and backward-data products and the masked decay, and
        recomputes it from the current kernel only in :func:`~bimask_jax.flax.state.refresh_state`
        (every ``refresh_every`` steps from step 0 under the training scripts; 40 in the authors'
        code). ``"step"``: the mask is recomputed from the kernel at every call.
      dense_products: every selected layer runs the plain dense product of its raw kernel (no mask,
        no S-STE weight, no MVUE), its state still created, checked and kept: the dense finish
        (:func:`~bimask_jax.flax.state.with_dense_products`).
    """

    n: int = 2
    m: int = 4
    method: str = "bimask"
    num_candidates: int = 100
    refresh_every: int = 100
    decay: float = 2e-4
    exclude: Any = None
    include: Any = None
    backend: str = "xla"
    chunk_size: int | None = None
    search: str = "auto"
    search_iterations: int = 100
    k_order: str = "hwi"
    keep_incumbent: bool = True
    wgrad: str = "dense"
    track_flips: bool = False
    mask_update: str = "step"
    dense_products: bool = False

    def __post_init__(self):
        n, m = check_nm(self.n, self.m)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("num_candidates", "refresh_every"):
            v = getattr(self, name)
            lo = 0 if name == "num_candidates" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be a Python int >= {lo}, got {v!r}")
        if not isinstance(self.decay, (int, float)) or self.decay < 0:
            raise ValueError(f"decay must be a float >= 0, got {self.decay!r}")
        object.__setattr__(self, "decay", float(self.decay))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        cs = self.chunk_size
        if cs is not None and (isinstance(cs, bool) or not isinstance(cs, int) or cs < 1):
            raise ValueError(f"chunk_size must be None or a Python int >= 1, got {cs!r}")
        if not isinstance(self.keep_incumbent, bool):
            raise ValueError(f"keep_incumbent must be a bool, got {self.keep_incumbent!r}")
        if self.search == "auto":
            local = m <= STRIPE_MAX_M and self.keep_incumbent
            object.__setattr__(self, "search", "stripe" if local else "random")
        if not self.keep_incumbent and self.search != "random":
            raise ValueError(f"keep_incumbent=False is a policy of search='random' (the local "
                             f"searches start from the incumbent), got search={self.search!r}")
        if self.search not in SEARCH_METHODS:
            raise ValueError(
                f"search must be 'auto' or one of {SEARCH_METHODS}, got {self.search!r}"
            )
        it = self.search_iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"search_iterations must be a Python int >= 0, got {it!r}")
        if self.k_order not in K_ORDERS:
            raise ValueError(f"k_order must be one of {K_ORDERS}, got {self.k_order!r}")
        if self.wgrad not in WGRADS:
            raise ValueError(f"wgrad must be one of {WGRADS}, got {self.wgrad!r}")
        if self.wgrad == "mvue" and n > 2:
            raise ValueError(f"wgrad='mvue' keeps n in (1, 2) of every m gradient entries, got n={n}")
        if self.mask_update not in MASK_UPDATES:
            raise ValueError(f"mask_update must be one of {MASK_UPDATES}, got {self.mask_update!r}")
        if self.mask_update == "refresh" and self.method != "transposable":
            raise ValueError(
                f"mask_update='refresh' (Hu et al.'s periodic update of the stored transposable "
                f"mask) needs method='transposable', got method={self.method!r}"
            )
        for name in ("track_flips", "dense_products"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "exclude", _normalize_filter("exclude", self.exclude))
        object.__setattr__(self, "include", _normalize_filter("include", self.include))
