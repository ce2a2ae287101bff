"""Block-diagonal permutation search: Bi-Mask's backward-mask permutation restricted to contiguous
column blocks, for layers whose output columns are split across devices (tensor parallelism).

A column-parallel layer of a tensor-parallel model holds columns ``[b * C/B, (b + 1) * C/B)`` of its
``(K, C)`` kernel on device ``b``. A permutation that sends a column to a group of ``m`` columns on
another device would make every step's backward mask gather the whole kernel. A *block-diagonal*
permutation (``perm[i]`` in the block of ``i``) keeps every group of ``m`` permuted columns on one
device, so the masks are computed from the local columns alone.

The permutation score (``bimask_jax.permutation``) is a sum over groups; when no group crosses a block
boundary it is the sum of the blocks' scores. So the best block-diagonal permutation is the best
permutation of every block on its own: :func:`search_blocked_permutation` runs
``search_permutation`` on every block (``vmap`` over the blocks) with the block's own key and
incumbent. Blocks are independent, so the search of a block runs where its columns live and needs
no communication; a block's key is ``keys[b]``, so a device that holds blocks ``b0..b1`` passes
``keys[b0:b1]`` and gets the same result as a single-device search of all blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bimask_jax._checks import check_divisible, check_kernel, check_nm, check_perm
from bimask_jax.permutation import search_permutation


def block_keys(key, blocks: int):
    """``(blocks,)`` PRNG keys (of ``key``'s kind: raw ``uint32[2]`` keys give ``(blocks, 2)``)
    for :func:`search_blocked_permutation`: block ``b`` gets ``jax.random.fold_in(key, b)``.
    ``blocks``: Python int >= 1."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a Python int >= 1, got {blocks!r}")
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(blocks, dtype=jnp.uint32))


def is_block_diagonal(perm, blocks: int) -> bool:
    """Whether the concrete permutation ``perm`` ``(C,)`` maps every one of ``blocks`` contiguous
    column blocks of size ``C / blocks`` onto itself (NumPy; not traceable)."""
    p = np.asarray(perm)
    c = p.shape[0]
    if blocks < 1 or c % blocks:
        raise ValueError(f"blocks={blocks} must be >= 1 and divide C={c}")
    if not np.array_equal(np.sort(p), np.arange(c)):
        return False
    cb = c // blocks
    return bool(np.all(p // cb == np.arange(c) // cb))


def search_blocked_permutation(
    keys,
    kernel,
    n: int,
    m: int,
    *,
    init=None,
    method: str = "random",
    num_candidates: int = 100,
    iterations: int = 100,
    kick: int = 0,
    chunk_size: int | None = None,
    checkify_perm: bool = True,
):
    """The best block-diagonal output-column permutation of Bi-Mask's backward mask.

    The ``C`` output columns are cut into ``B = keys.shape[0]`` contiguous blocks of ``C / B``
    columns; block ``b`` is searched with
    ``search_permutation(keys[b], kernel[..., block b], n, m, init=<init of block b>, method=...)``
    (``vmap`` over the blocks) and the results are put back on the diagonal. Since the score is a
    sum over blocks, the result scores ``sum_b`` (the best score that the search of block ``b``
    found), and at least as much as ``init``.

    Args:
      keys: ``(B,)`` PRNG keys, one per block (e.g. :func:`block_keys`).
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``; ``C % B == 0``, ``(C / B) % m == 0``
        and ``Cin % m == 0``.
      n, m: the N:M ratio (Python ints).
      init: int ``(C,)`` block-diagonal incumbent (default: the identity). Checked to be
        block-diagonal when concrete; under ``jit`` a non-block-diagonal ``init`` is not detected
        and its entries are taken modulo the block size (the result is still a block-diagonal
        permutation whenever ``init`` is one).
      method, num_candidates, iterations, kick, chunk_size, checkify_perm: as in
        ``search_permutation``.

    Returns:
      int32 ``(C,)``, block-diagonal: ``out[i] // (C / B) == i // (C / B)``.
    """
    n, m = check_nm(n, m)
    kernel = jnp.asarray(kernel)
    check_kernel(kernel)
    keys = jnp.asarray(keys)
    if keys.ndim < 1:
        raise ValueError(f"keys must hold one PRNG key per block, got shape {keys.shape}")
    blocks = keys.shape[0]
    c = kernel.shape[-1]
    if blocks < 1 or c % blocks:
        raise ValueError(f"the number of blocks (keys.shape[0]={blocks}) must divide C={c}")
    cb = c // blocks
    check_divisible(cb, m, "block size C / blocks")
    check_divisible(kernel.shape[-2], m, "kernel input axis (-2)")
    if init is None:
        init = jnp.arange(c, dtype=jnp.int32)
    else:
        init = check_perm(init, c, "init")
        if not isinstance(init, jax.core.Tracer) and not is_block_diagonal(init, blocks):
            raise ValueError(f"init must be block-diagonal with {blocks} blocks of {cb} columns")
        init = jnp.asarray(init, jnp.int32)
    w = kernel.reshape(-1, blocks, cb).transpose(1, 0, 2)  # (B, K, cb)
    local_init = init.reshape(blocks, cb) % cb

    def one(key, wb, pb):
        return search_permutation(key, wb, n, m, num_candidates, init=pb, chunk_size=chunk_size,
                                  method=method, iterations=iterations, kick=kick,
                                  checkify_perm=checkify_perm)

    local = jax.vmap(one)(keys, w, local_init).astype(jnp.int32)  # (B, cb)
    offsets = (jnp.arange(blocks, dtype=jnp.int32) * cb)[:, None]
    return (local + offsets).reshape(c)
