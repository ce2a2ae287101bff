"""Invalid inputs never give a silent wrong answer (issue 14): invalid permutations under ``jit`` fall
back to the identity (or fail under checkify), concrete ones raise; bad decay, strides and empty
kernels raise a ValueError naming the parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import bimask_jax as bj
from tests import nm_reference as ref

N, M = 2, 4


def _kernel(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _invalid_perms(c):
    ident = np.arange(c)
    out_of_range = ident.copy()
    out_of_range[0] = -1
    too_big = ident.copy()
    too_big[3] = c + 5
    dup = ident.copy()
    dup[1] = dup[2]
    return {"minus_one": out_of_range, "too_big": too_big, "duplicate": dup}


@pytest.mark.parametrize("which", ["minus_one", "too_big", "duplicate"])
def test_traced_invalid_perm_gives_the_identity_backward_mask(which):
    w = _kernel((16, 8))
    perm = jnp.asarray(_invalid_perms(8)[which], jnp.int32)
    fwd = bj.forward_mask(w, N, M)
    bwd = np.asarray(jax.jit(lambda w, f, p: bj.backward_mask(w, f, p, N, M))(w, fwd, perm))
    fwd = np.asarray(fwd)
    assert not np.any(bwd & ~fwd), "backward mask must be a subset of the forward mask"
    assert ref.is_nm(bwd, N, M, axis=1)  # N:M after its (identity) permutation
    np.testing.assert_array_equal(bwd, ref.backward_mask(w, fwd, np.arange(8), N, M))
    f2, b2 = jax.jit(lambda w, p: bj.layer_masks(w, N, M, "bimask", p))(w, perm)
    np.testing.assert_array_equal(b2, bwd)
    # the score is the count of that mask (never garbage such as -1996)
    score = jax.jit(lambda f, p: bj.permutation_score(w, f, p, N, M))(fwd, perm)
    assert int(score) == int(bwd.sum())
    inv = jax.jit(bj.inverse_permutation)(perm)
    np.testing.assert_array_equal(inv, np.arange(8))


def test_traced_invalid_perm_under_vmap_and_conv_kernel():
    w = _kernel((2, 3, 3, 4, 8))
    perms = jnp.stack([jnp.asarray(_invalid_perms(8)["duplicate"]), jnp.arange(8)[::-1]])
    fwd, bwd = jax.vmap(lambda k, p: bj.layer_masks(k, N, M, "bimask", p))(w, perms)
    fwd, bwd = np.asarray(fwd), np.asarray(bwd)
    assert not np.any(bwd & ~fwd)
    np.testing.assert_array_equal(bwd[0], ref.backward_mask(w[0], fwd[0], np.arange(8), N, M))
    p1 = np.arange(8)[::-1]
    np.testing.assert_array_equal(bwd[1], ref.backward_mask(w[1], fwd[1], p1, N, M))


@pytest.mark.parametrize("method", ["random", "stripe", "swap"])
def test_search_never_returns_an_invalid_init(method):
    w = _kernel((32, 16), 1)
    bad = jnp.asarray(_invalid_perms(16)["minus_one"], jnp.int32)
    budget = {"random": {"num_candidates": 0}, "stripe": {"iterations": 0},
              "swap": {"iterations": 0}}[method]
    for kw in (budget, {"num_candidates": 5, "iterations": 3}):
        out = jax.jit(
            lambda k, p, kw=kw: bj.search_permutation(k, w, N, M, init=p, method=method, **kw)
        )(jax.random.key(0), bad)
        assert sorted(np.asarray(out).tolist()) == list(range(16))


def test_checkify_reports_an_invalid_perm():
    w = _kernel((16, 8))
    fwd = bj.forward_mask(w, N, M)
    bad = jnp.asarray(_invalid_perms(8)["duplicate"], jnp.int32)
    checked = checkify.checkify(jax.jit(lambda p: bj.backward_mask(w, fwd, p, N, M)))
    err, _ = checked(bad)
    with pytest.raises(checkify.JaxRuntimeError, match="perm is not a permutation of range\\(8\\)"):
        err.throw()
    err, _ = checked(jnp.arange(8))
    err.throw()  # a valid perm: no error


def test_concrete_invalid_perms_raise():
    w = _kernel((16, 8))
    fwd = bj.forward_mask(w, N, M)
    for bad in _invalid_perms(8).values():
        with pytest.raises(ValueError, match="perm is not a permutation of range\\(8\\)"):
            bj.backward_mask(w, fwd, bad, N, M)
        with pytest.raises(ValueError, match="perm is not a permutation"):
            bj.permutation_score(w, fwd, bad, N, M)
        with pytest.raises(ValueError, match="init is not a permutation"):
            bj.search_permutation(jax.random.key(0), w, N, M, init=bad)
        with pytest.raises(ValueError, match="perm is not a permutation"):
            bj.inverse_permutation(bad)


def test_python_list_perm():
    w = _kernel((16, 8))
    fwd = bj.forward_mask(w, N, M)
    perm = [3, 1, 2, 0, 7, 6, 5, 4]
    got = bj.backward_mask(w, fwd, perm, N, M)
    np.testing.assert_array_equal(got, bj.backward_mask(w, fwd, np.asarray(perm), N, M))
    assert int(bj.permutation_score(w, fwd, tuple(perm), N, M)) == int(got.sum())
    np.testing.assert_array_equal(bj.inverse_permutation(perm), np.argsort(perm))
    _, b = bj.layer_masks(w, N, M, "bimask", perm)
    np.testing.assert_array_equal(b, got)
    with pytest.raises(ValueError, match="perm must have an integer dtype"):
        bj.backward_mask(w, fwd, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], N, M)
    with pytest.raises(ValueError, match="perm must be an integer array"):
        bj.backward_mask(w, fwd, [[0, 1], [2]], N, M)


@pytest.mark.parametrize("decay", [float("nan"), -1e-4, float("inf"), "x"])
def test_bad_decay(decay):
    x = _kernel((4, 16))
    w = _kernel((16, 8))
    f, b = bj.layer_masks(w, N, M, "bimask")
    with pytest.raises(ValueError, match="decay"):
        bj.sparse_dense(x, w, f, b, decay=decay)
    wc = _kernel((3, 3, 4, 8))
    fc, bc = bj.layer_masks(wc, N, M, "bimask")
    with pytest.raises(ValueError, match="decay"):
        bj.sparse_conv(_kernel((1, 5, 5, 4)), wc, fc, bc, decay=decay)


def test_traced_decay_is_refused_clearly():
    x, w = _kernel((4, 16)), _kernel((16, 8))
    f, b = bj.layer_masks(w, N, M, "bimask")
    with pytest.raises(ValueError, match="decay must be a concrete Python float"):
        jax.jit(lambda d: bj.sparse_dense(x, w, f, b, decay=d))(0.1)


@pytest.mark.parametrize("strides", [0, -1, (1, 0), (2, -1)])
def test_bad_strides(strides):
    wc = _kernel((3, 3, 4, 8))
    fc, bc = bj.layer_masks(wc, N, M, "bimask")
    with pytest.raises(ValueError, match="strides must be an int >= 1"):
        bj.sparse_conv(_kernel((1, 5, 5, 4)), wc, fc, bc, strides=strides)
    with pytest.raises(ValueError, match="rhs_dilation must be an int >= 1"):
        bj.sparse_conv(_kernel((1, 5, 5, 4)), wc, fc, bc, rhs_dilation=strides)


@pytest.mark.parametrize("shape", [(16, 0), (0, 8), (3, 3, 4, 0), (0, 3, 4, 8)])
def test_empty_kernel(shape):
    w = jnp.zeros(shape, jnp.float32)
    fwd = jnp.zeros(shape, bool)
    match = "kernel must not have an axis of size 0"
    for call in (
        lambda: bj.forward_mask(w, N, M),
        lambda: bj.backward_mask(w, fwd, jnp.arange(shape[-1]), N, M),
        lambda: bj.layer_masks(w, N, M, "bimask"),
        lambda: bj.layer_masks(w, N, M, "dense"),
        lambda: bj.transposable_mask(w, N, M),
        lambda: bj.permutation_score(w, fwd, jnp.arange(shape[-1]), N, M),
        lambda: bj.search_permutation(jax.random.key(0), w, N, M),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="fwd must be a bool mask with >= 2 axes, none of size 0"):
        bj.retained_upper_bound(fwd, N, M)
    x = jnp.zeros((2, shape[-2]) if len(shape) == 2 else (1, 5, 5, shape[-2]), jnp.float32)
    op = bj.sparse_dense if len(shape) == 2 else bj.sparse_conv
    with pytest.raises(ValueError, match=match):
        op(x, w, fwd, fwd)


@pytest.mark.slow  # the interpret-mode kernel takes ~half a minute to trace and run under jit
def test_resparsify_under_jit_with_an_invalid_perm_uses_the_identity():
    import pallas_kernels as pk

    w = _kernel((8, 8), 4)
    bad = jnp.asarray(_invalid_perms(8)["duplicate"], jnp.int32)
    got = jax.jit(lambda w, p: pk.resparsify(w, p, block_k=8, block_c=8))(w, bad)
    want = pk.resparsify(w, jnp.arange(8), block_k=8, block_c=8)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
