"""Every public function of the core hits a compile cache when called eagerly again with the same
shapes and static arguments (issue 13 §1): the second call traces nothing and compiles nothing.

The counter listens to JAX's own monitoring events: one ``jaxpr_trace_duration`` event per traced
function (jit bodies and eager primitives alike) and one ``backend_compile_duration`` per compile.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj

_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def count_traces():
    seen = []

    def listener(event, duration, **kwargs):
        if event in _EVENTS:
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16)), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    stem = jnp.asarray(rng.standard_normal((3, 3, 3, 8)), jnp.float32)  # K = 27
    perm = jnp.asarray(rng.permutation(16), jnp.int32)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 8)), jnp.float32)
    xd = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    return w, w2, stem, perm, x, xd


CALLS = {
    "nm_mask": lambda w, w2, stem, p, x, xd: bj.nm_mask(w, 2, 4, axis=-1),
    "forward_mask": lambda w, w2, stem, p, x, xd: bj.forward_mask(w, 2, 4),
    "forward_mask_ihw": lambda w, w2, stem, p, x, xd: bj.forward_mask(stem, 2, 4, k_order="ihw"),
    "backward_mask": lambda w, w2, stem, p, x, xd: bj.backward_mask(
        w, bj.forward_mask(w, 2, 4), p, 2, 4
    ),
    "transposable_mask": lambda w, w2, stem, p, x, xd: bj.transposable_mask(w, 2, 4),
    "layer_masks_bimask": lambda w, w2, stem, p, x, xd: bj.layer_masks(w, 2, 4, "bimask", p),
    "layer_masks_ihw": lambda w, w2, stem, p, x, xd: bj.layer_masks(
        stem, 2, 4, "bimask", k_order="ihw"
    ),
    "layer_masks_srste": lambda w, w2, stem, p, x, xd: bj.layer_masks(w, 2, 4, "srste"),
    "layer_masks_dense": lambda w, w2, stem, p, x, xd: bj.layer_masks(w, 2, 4, "dense"),
    "inverse_permutation": lambda w, w2, stem, p, x, xd: bj.inverse_permutation(p),
    "permutation_score": lambda w, w2, stem, p, x, xd: bj.permutation_score(
        w, bj.forward_mask(w, 2, 4), p, 2, 4
    ),
    "search_random": lambda w, w2, stem, p, x, xd: bj.search_permutation(
        jax.random.key(0), w, 2, 4, 10, init=p
    ),
    "search_stripe": lambda w, w2, stem, p, x, xd: bj.search_permutation(
        jax.random.key(0), w, 2, 4, method="stripe", iterations=3
    ),
    "search_swap": lambda w, w2, stem, p, x, xd: bj.search_permutation(
        jax.random.key(0), w, 2, 4, method="swap", iterations=2
    ),
    "retained_upper_bound": lambda w, w2, stem, p, x, xd: bj.retained_upper_bound(
        bj.forward_mask(w, 2, 4), 2, 4
    ),
    "search_efficacy": lambda w, w2, stem, p, x, xd: bj.search_efficacy(
        jnp.int32(5), jnp.int32(3), jnp.int32(9)
    ),
    "sparse_dense": lambda w, w2, stem, p, x, xd: bj.sparse_dense(
        xd, w2, *bj.layer_masks(w2, 2, 4, "srste"), decay=2e-4
    ),
    "sparse_conv": lambda w, w2, stem, p, x, xd: bj.sparse_conv(
        x, w, *bj.layer_masks(w, 2, 4, "bimask", p), strides=2, padding="SAME"
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_second_eager_call_does_not_retrace(name):
    fn = CALLS[name]
    jax.block_until_ready(fn(*_inputs(0)))  # first call: traces and compiles
    args = _inputs(1)  # new arrays, same shapes and dtypes
    with count_traces() as seen:
        jax.block_until_ready(fn(*args))
    assert seen == [], f"{name}: a second eager call traced/compiled {len(seen)} time(s)"


def test_counter_sees_a_retrace():
    # The counter itself works: a new shape must trace.
    bj.forward_mask(jnp.ones((8, 4)), 2, 4)
    with count_traces() as seen:
        bj.forward_mask(jnp.ones((12, 4)), 2, 4)
    assert seen
