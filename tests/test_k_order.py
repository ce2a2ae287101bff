"""``k_order="ihw"``: the reference implementation's grouping of a conv kernel (issue 12), checked
against a NumPy statement of its rule, written from reading its ``conv_type.py``:

* the weight ``(Cout, Cin, kh, kw)`` is viewed as ``w = weight.view(Cout, -1).t()``, ``(K, Cout)``;
* forward: ``|w.t()|`` flattened row-major, groups of M consecutive entries, the N largest kept
  (groups straddle output channels when K % M != 0);
* backward: the forward-masked ``w`` with its columns permuted (``w_s.t()[perm].t()``), flattened
  row-major, groups of M consecutive entries, the N largest kept, ANDed with the permuted forward
  mask and scattered back to the original columns (groups straddle rows when Cout % M != 0);
* the permutation's score is the number of entries of that backward mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj


def _top_n_groups(flat, n, m):
    """Keep the n largest of every m consecutive entries (ties: the lower index)."""
    keep = np.zeros(flat.shape, bool)
    for g in range(0, flat.size, m):
        order = sorted(range(m), key=lambda i, g=g: (-flat[g + i], i))
        keep[[g + i for i in order[:n]]] = True
    return keep


def reference_masks(kernel_hwio, perm, n, m):
    """(fwd, bwd) of the reference procedure for a Flax HWIO kernel, returned in HWIO."""
    k = np.asarray(kernel_hwio, np.float64)
    *window, cin, cout = k.shape
    weight = np.moveaxis(k, (-1, -2), (0, 1))  # PyTorch (Cout, Cin, *window)
    w = weight.reshape(cout, -1).T  # (K, Cout), rows in (Cin, *window) order
    fm = _top_n_groups(np.abs(w.T).reshape(-1), n, m).reshape(cout, -1).T  # (K, Cout)
    ws = w * fm
    wb = ws[:, perm]  # columns permuted
    mb = _top_n_groups(np.abs(wb).reshape(-1), n, m).reshape(wb.shape)
    final = fm[:, perm] & mb
    bm = np.zeros_like(final)
    bm[:, perm] = final

    def to_hwio(mat):
        return np.moveaxis(mat.T.reshape(cout, cin, *window), (0, 1), (-1, -2))

    return to_hwio(fm), to_hwio(bm)


CASES = [
    ((3, 3, 3, 8), 2, 4),  # stem: K = 27, forward groups straddle output channels
    ((3, 3, 4, 10), 2, 4),  # C % m != 0: backward groups straddle rows
    ((1, 1, 8, 10), 1, 4),  # a 1x1 classifier with 10 outputs
    ((3, 3, 8, 16), 2, 4),
    ((3, 3, 1, 8), 2, 8),
    ((5, 5, 3, 12), 1, 4),
]


@pytest.mark.parametrize("shape,n,m", CASES)
def test_ihw_masks_and_score_match_the_reference_rule(shape, n, m):
    rng = np.random.default_rng(sum(shape) + n + m)
    w = rng.standard_normal(shape).astype(np.float32)
    perm = rng.permutation(shape[-1])
    want_f, want_b = reference_masks(w, perm, n, m)
    f = bj.forward_mask(w, n, m, k_order="ihw")
    np.testing.assert_array_equal(f, want_f)
    fl, bl = bj.layer_masks(w, n, m, "bimask", perm, k_order="ihw")
    np.testing.assert_array_equal(fl, want_f)
    np.testing.assert_array_equal(bl, want_b)
    np.testing.assert_array_equal(bj.backward_mask(w, f, perm, n, m, k_order="ihw"), want_b)
    score = bj.permutation_score(w, f, perm, n, m, k_order="ihw")
    assert int(score) == int(want_b.sum())
    assert int(bj.retained_upper_bound(f, n, m, k_order="ihw")) >= int(score)
    # under jit with a traced perm: same masks
    _, bj_ = jax.jit(lambda k, p: bj.layer_masks(k, n, m, "bimask", p, k_order="ihw"))(w, perm)
    np.testing.assert_array_equal(bj_, want_b)


def test_ihw_differs_from_hwi_on_3x3_convs():
    w = np.random.default_rng(0).standard_normal((3, 3, 8, 16)).astype(np.float32)
    a = np.asarray(bj.forward_mask(w, 2, 4))
    b = np.asarray(bj.forward_mask(w, 2, 4, k_order="ihw"))
    assert (a != b).mean() > 0.1


def test_ihw_search_scores_as_the_reference():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 3, 4, 10)).astype(np.float32)
    f = bj.forward_mask(w, 2, 4, k_order="ihw")
    ident = int(bj.permutation_score(w, f, np.arange(10), 2, 4, k_order="ihw"))
    best = np.asarray(bj.search_permutation(jax.random.key(0), w, 2, 4, 50, k_order="ihw"))
    assert sorted(best.tolist()) == list(range(10))
    _, want_b = reference_masks(w, best, 2, 4)
    got = int(bj.permutation_score(w, f, best, 2, 4, k_order="ihw"))
    assert got == int(want_b.sum()) >= ident


@pytest.mark.parametrize("shape", [(16, 8), (1, 1, 16, 8), (12, 8)])
def test_dense_and_1x1_kernels_agree_in_both_orders(shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    perm = rng.permutation(shape[-1])
    for method in ("bimask", "transposable"):
        a = bj.layer_masks(w, 2, 4, method, perm)
        b = bj.layer_masks(w, 2, 4, method, perm, k_order="ihw")
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    f = bj.forward_mask(w, 2, 4)
    assert int(bj.permutation_score(w, f, perm, 2, 4)) == int(
        bj.permutation_score(w, f, perm, 2, 4, k_order="ihw")
    )


def test_k_order_errors():
    w = jnp.ones((3, 3, 3, 8))
    with pytest.raises(ValueError, match="kernel input axis \\(-2\\) of size 3 is not divisible"):
        bj.forward_mask(w, 2, 4)  # "hwi" needs Cin % m == 0
    with pytest.raises(ValueError, match="k_order must be one of \\('hwi', 'ihw'\\)"):
        bj.forward_mask(w, 2, 4, k_order="oihw")
    with pytest.raises(ValueError, match="k_order must be one of"):
        bj.layer_masks(w, 2, 4, "dense", k_order="chw")
    with pytest.raises(ValueError, match="has 27 entries, not divisible by m=4"):
        bj.forward_mask(jnp.ones((3, 3, 3, 1)), 2, 4, k_order="ihw")
    w10 = jnp.ones((3, 3, 4, 10))
    with pytest.raises(ValueError, match="method='stripe' needs C % m == 0"):
        bj.search_permutation(jax.random.key(0), w10, 2, 4, method="stripe", k_order="ihw")
    with pytest.raises(ValueError, match="kernel reduction size K of size 27 is not divisible"):
        bj.transposable_mask(w, 2, 4, k_order="ihw")


def test_ihw_matrix_view_equals_the_conv_kernel():
    # A caller that stacks layers as matrices (the Flax refresh) passes each conv kernel as its
    # "ihw" matrix: Cin moved first, flattened to (Cin*kh*kw, C). With k_order="ihw" the masks are
    # those of the 4-D kernel.
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 3, 3, 8)).astype(np.float32)
    perm = rng.permutation(8)
    mat = np.moveaxis(w, -2, 0).reshape(-1, 8)
    f4, b4 = bj.layer_masks(w, 2, 4, "bimask", perm, k_order="ihw")
    f2, b2 = bj.layer_masks(mat, 2, 4, "bimask", perm, k_order="ihw")
    back = lambda a: np.moveaxis(np.asarray(a).reshape(3, 3, 3, 8), 0, -2)  # noqa: E731
    np.testing.assert_array_equal(back(f2), f4)
    np.testing.assert_array_equal(back(b2), b4)
