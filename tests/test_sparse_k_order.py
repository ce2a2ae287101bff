"""``bimask_jax.sparse(..., k_order="ihw")``: Flax layers use the reference implementation's groups
(checked against the NumPy statement of its rule in ``test_k_order``), stems with 3 input channels
become sparse, straddling layers are searched with the random search, and the default is unchanged.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bimask_jax as bj
import bimask_jax.flax as bf
from bimask_jax.permutation import permutation_score
from tests.test_k_order import reference_masks


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(12, (3, 3), name="stem")(x)  # K = 27: forward groups straddle channels
        x = nn.Conv(10, (3, 3), name="conv")(nn.relu(x))  # C = 10: backward groups straddle rows
        return nn.Dense(8, name="head")(x.mean((1, 2)))  # K = 10: only ihw makes it sparse


def _init(k_order, **kw):
    model = bj.sparse(Net(), k_order=k_order, **kw)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    return model, model.init(jax.random.key(1), x), x


@pytest.mark.slow
def test_default_is_hwi_and_skips_the_stem():
    model, v, x = _init("hwi")
    layers = {x.path: x for x in bf.layers(model, sample_args=(x,))}
    assert not layers["stem"].sparse and "input channels 3" in layers["stem"].note
    assert layers["conv"].sparse and layers["conv"].method == "srste"  # C = 10
    assert not layers["head"].sparse and "input channels 10" in layers["head"].note


@pytest.mark.slow
def test_ihw_selection_methods_and_notes():
    model, v, x = _init("ihw", search="stripe")
    layers = {x.path: x for x in bf.layers(model, sample_args=(x,))}
    assert all(layers[p].sparse for p in ("stem", "conv", "head"))
    assert {p: layers[p].method for p in layers} == {"stem": "bimask", "conv": "bimask",
                                                     "head": "bimask"}
    assert "random search" in layers["conv"].note
    assert layers["stem"].note == layers["head"].note == ""
    model_t, _, _ = _init("ihw", method="transposable")
    lt = {x.path: x for x in bf.layers(model_t, sample_args=(x,))}
    assert lt["stem"].method == "srste" and "K=27" in lt["stem"].note
    assert lt["conv"].method == "srste" and "C=10" in lt["conv"].note
    with pytest.raises(ValueError, match="k_order must be one of"):
        bj.sparse(Net(), k_order="chw")


@pytest.mark.parametrize("cin,cout", [(3, 12), (12, 10)])
def test_ihw_layers_compute_the_reference_masks(cin, cout):
    """y and dx of a sparse conv equal those of a plain conv with the reference's masks (NumPy
    rule), for a stem (forward groups straddle) and C % m != 0 (backward groups straddle)."""

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, z):
            return nn.Conv(cout, (3, 3), use_bias=False, name="conv")(z)

    model = bj.sparse(Probe(), k_order="ihw")
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, cin))
    v = model.init(jax.random.key(1), x)
    perm = np.random.default_rng(0).permutation(cout)
    v = {**v, "bimask": {"conv": {**v["bimask"]["conv"], "perm": jnp.asarray(perm, jnp.int32)}}}
    kernel = v["params"]["conv"]["kernel"]
    fwd, bwd = reference_masks(np.asarray(kernel), perm, 2, 4)

    def conv(w, xx):
        return jax.lax.conv_general_dilated(xx, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y, vjp = jax.vjp(lambda xx: model.apply(v, xx), x)
    np.testing.assert_allclose(y, conv(kernel * fwd, x), rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.key(2), y.shape)
    (dx,) = vjp(g)
    (dx_fwd,) = jax.vjp(lambda xx: conv(kernel * fwd, xx), x)[1](g)
    (dx_bwd,) = jax.vjp(lambda xx: conv(kernel * bwd, xx), x)[1](g)
    np.testing.assert_allclose(dx, dx_bwd, rtol=1e-5, atol=1e-5)
    assert not np.allclose(dx_fwd, dx_bwd)  # the backward mask is not the forward one
    row = bf.summary(model, v, print_fn=None)[0]
    assert row["fwd_density"] == pytest.approx(0.5)
    assert row["bwd_density"] == pytest.approx(bwd.mean())
    assert 0.0 <= row["efficacy"] <= 1.0


@pytest.mark.slow
def test_ihw_refresh_keeps_or_improves_the_reference_score():
    model, v, x = _init("ihw", num_candidates=20)
    new = bf.refresh(jax.random.key(3), model, v)
    for path in ("stem", "conv", "head"):
        kernel = v["params"][path]["kernel"]
        fwd = bj.forward_mask(kernel, 2, 4, k_order="ihw")
        old_p, new_p = v["bimask"][path]["perm"], new[path]["perm"]
        s0 = int(permutation_score(kernel, fwd, old_p, 2, 4, k_order="ihw"))
        s1 = int(permutation_score(kernel, fwd, new_p, 2, 4, k_order="ihw"))
        assert s1 >= s0
        assert int(new[path]["refreshes"]) == 1
    # pure and identical under jit
    again = jax.jit(lambda k, vv: bf.refresh(k, model, vv))(jax.random.key(3), v)
    for path in ("stem", "conv", "head"):
        np.testing.assert_array_equal(again[path]["perm"], new[path]["perm"])


@pytest.mark.slow
def test_ihw_nnx_matches_linen():
    class NetX(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Conv(4, 10, (3, 3), rngs=rngs)

        def __call__(self, x):
            return self.stem(x)

    mx = bj.sparse(NetX(nnx.Rngs(0)), k_order="ihw")
    info = bf.layers(mx)[0]
    assert info.sparse and info.method == "bimask" and "random search" in info.note
    kernel = mx.stem.kernel[...]
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    fwd, _ = reference_masks(np.asarray(kernel), np.arange(10), 2, 4)
    y_ref = jax.lax.conv_general_dilated(x, kernel * fwd, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(mx(x) - mx.stem.bias[...], y_ref, rtol=1e-5, atol=1e-5)
    nnx.update(mx, bf.refresh(jax.random.key(1), mx))
    assert int(mx.stem.conv_general_dilated.refreshes[...]) == 1
