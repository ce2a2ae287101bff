"""2:4 sparse Pallas kernels: compressed format, sparse matmuls, re-sparsify.

Knows nothing of Flax or of Bi-Mask's permutation search. Needs only jax (its Pallas Triton
lowering); imports with CPU-only jax, where every kernel runs in Pallas interpret mode.
"""

from pallas_kernels.format import compress, decompress, top2_mask
from pallas_kernels.resparsify_kernel import Resparsified, resparsify, resparsify_reference
from pallas_kernels.sparse_matmul import spmm, spmm_bwd_data, spmm_reference

__all__ = [
    "Resparsified",
    "compress",
    "decompress",
    "resparsify",
    "resparsify_reference",
    "spmm",
    "spmm_bwd_data",
    "spmm_reference",
    "top2_mask",
]
