"""Which layers become sparse, and with which method. Pure functions of shapes and options.

The rule (the same for linen and nnx):

1. Name filters: a layer whose path does not match ``include`` (when given) or matches ``exclude``
   is skipped.
2. Structure: grouped/depthwise convs (``feature_group_count > 1``), DenseGeneral/LinearGeneral with
   batch axes, and layers that already carry a custom ``dot_general``/``conv_general_dilated`` are
   skipped.
3. Forward mask: with ``k_order="hwi"`` the innermost input axis of the kernel (``Cin``, axis -2
   of a Dense/Conv kernel; the last input axis of a DenseGeneral kernel) must be divisible by ``m``
   (else skipped, e.g. an RGB stem with 3 input channels); with ``k_order="ihw"`` (groups of the
   flattened kernel, the reference's) the kernel size ``K * C`` must be.
4. Backward mask: ``"bimask"`` with ``"hwi"`` also needs the output size ``C`` (product of the
   output axes) divisible by ``m`` (with ``"ihw"`` its groups straddle rows, rule 3 is enough);
   ``"transposable"`` needs ``C`` and, with ``"ihw"``, ``K`` divisible by ``m``. A layer that passes
   1-3 but not this one falls back to ``"srste"`` (forward N:M mask, backward product with the
   forward pattern), and ``summary`` says so.
5. Search: a ``"bimask"`` layer whose backward groups straddle rows (``"ihw"``, ``C % m != 0``) is
   searched with ``"random"`` (the local searches need ``C % m == 0``); ``summary`` says so.
"""

from __future__ import annotations

import dataclasses
import math

from bimask_jax.flax.config import SparseConfig, filter_matches


@dataclasses.dataclass(frozen=True)
class Layer:
    """One candidate layer (linen Dense/DenseGeneral/Conv, nnx Linear/LinearGeneral/Conv) and the
    rule's outcome for it: ``path`` (``"a/b"``), ``kind`` (class name), ``kernel_shape`` (None when
    skipped before its kernel was seen), ``sparse``, ``method`` (effective method, ``""`` when
    skipped) and ``note`` (why it is skipped, or a fallback note)."""

    path: str
    kind: str
    kernel_shape: tuple[int, ...] | None
    sparse: bool
    method: str = ""
    note: str = ""


def no_sparse_message(cfg: SparseConfig, layers) -> str:
    """The error when the selection rule makes no layer sparse, with each layer's reason."""
    why = "".join(f"\n  {x.path or '<root>'} ({x.kind}): {x.note}" for x in layers)
    return (f"bimask_jax.sparse(n={cfg.n}, m={cfg.m}, method={cfg.method!r}) makes no layer of "
            f"this model sparse: " + (f"every candidate layer is skipped:{why}" if layers else
                                      "it has no Dense/DenseGeneral/Conv (linen) or "
                                      "Linear/LinearGeneral/Conv (nnx) layer"))


def name_skip_reason(cfg: SparseConfig, path: str, module) -> str:
    """Rule 1: ``""`` when the filters keep the layer, else the reason it is skipped."""
    if cfg.include is not None and not filter_matches(cfg.include, path, module):
        return "not matched by include"
    if cfg.exclude is not None and filter_matches(cfg.exclude, path, module):
        return "excluded"
    return ""


def decide(cfg: SparseConfig, path: str, kind: str, kernel_shape, in_channels: int,
           out_size: int, reason: str = "") -> Layer:
    """Rules 3-5 from the (unstacked) kernel shape, its innermost input-axis size and the output
    size ``C``, unless rules 1-2 (or an unsupported product) already gave a skip ``reason``."""
    size = math.prod(kernel_shape)
    if not reason and cfg.k_order == "hwi" and in_channels % cfg.m:
        reason = f"input channels {in_channels} not divisible by m={cfg.m}"
    if not reason and cfg.k_order == "ihw" and size % cfg.m:
        reason = f"kernel size {size} not divisible by m={cfg.m} (k_order='ihw')"
    if reason:
        return Layer(path, kind, kernel_shape, False, "", reason)
    method, note = effective_method(cfg, out_size, size // out_size)
    if method == "bimask":
        note = search_method(cfg, out_size)[1]
    return Layer(path, kind, kernel_shape, True, method, note)


def effective_method(cfg: SparseConfig, out_size: int, k: int) -> tuple[str, str]:
    """Rule 4: ``(method, note)`` for a sparse layer read as the ``(k, out_size)`` matrix."""
    c, m = out_size, cfg.m
    if cfg.method == "bimask" and cfg.k_order == "hwi" and c % m:
        return "srste", f"bimask needs C % m == 0 (C={c}, m={m}): srste fallback"
    if cfg.method == "transposable" and (c % m or (cfg.k_order == "ihw" and k % m)):
        need = "C % m == 0" if cfg.k_order == "hwi" else "K % m == 0 and C % m == 0"
        return "srste", f"transposable needs {need} (K={k}, C={c}, m={m}): srste fallback"
    return cfg.method, ""


def search_method(cfg: SparseConfig, out_size: int) -> tuple[str, str]:
    """Rule 5: ``(search, note)``, the ``search_permutation`` method of a ``"bimask"`` layer."""
    if cfg.k_order == "ihw" and out_size % cfg.m and cfg.search != "random":
        return "random", (f"{cfg.search} search needs C % m == 0 (C={out_size}, m={cfg.m}): "
                          "random search")
    return cfg.search, ""
