"""Which layers become sparse, and with which method. Pure functions of shapes and options.

The rule (the same for linen and nnx):

1. Name filters: a layer whose path does not match ``include`` (when given) or matches ``exclude``
   is skipped.
2. Structure: grouped/depthwise convs (``feature_group_count > 1``), DenseGeneral/LinearGeneral with
   batch axes, and layers that already carry a custom ``dot_general``/``conv_general_dilated`` are
   skipped.
3. Forward mask: the innermost input axis of the kernel (``Cin``, axis -2 of a Dense/Conv kernel;
   the last input axis of a DenseGeneral kernel) must be divisible by ``m``; else skipped (e.g. an
   RGB stem with 3 input channels).
4. Backward mask: ``"bimask"`` and ``"transposable"`` also need the output size ``C`` (product of the
   output axes) divisible by ``m``. A layer that passes 1-3 but not this one falls back to
   ``"srste"`` (forward N:M mask, backward product with the forward pattern), and ``summary`` says so.
"""

from __future__ import annotations

import dataclasses

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
    """Rules 3 and 4 from the innermost input-axis size and the output size ``C``, unless rules
    1-2 (or an unsupported product) already gave a skip ``reason``."""
    if not reason and in_channels % cfg.m:
        reason = f"input channels {in_channels} not divisible by m={cfg.m}"
    if reason:
        return Layer(path, kind, kernel_shape, False, "", reason)
    return Layer(path, kind, kernel_shape, True, *effective_method(cfg, out_size))


def effective_method(cfg: SparseConfig, out_size: int) -> tuple[str, str]:
    """Rule 4: ``(method, note)`` for a sparse layer with ``out_size`` output columns."""
    if cfg.method in ("bimask", "transposable") and out_size % cfg.m:
        return "srste", f"{cfg.method} needs C % m == 0 (C={out_size}, m={cfg.m}): srste fallback"
    return cfg.method, ""
