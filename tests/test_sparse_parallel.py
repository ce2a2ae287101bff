"""Data parallel on 2 host devices: a batch-sharded jitted train step of a wrapped model (with the
refresh inside the step) gives the single-device losses, grads and permutations, and every device
holds the same permutation (linen; nnx: losses and permutations). Runs in a subprocess so
XLA_FLAGS does not leak into other tests."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import bimask_jax.flax as bf

    assert jax.device_count() == 2, jax.devices()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
            x = nn.relu(nn.Conv(16, (3, 3), name="conv2")(x)).mean((1, 2))
            return nn.Dense(8, name="fc")(x)

    model = bf.sparse(Net(), num_candidates=20, refresh_every=2)
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 4))
    t = jax.random.normal(jax.random.key(1), (8, 8))
    v = jax.jit(model.init)(jax.random.key(2), x)
    tx = optax.sgd(0.3)

    def step(params, opt, bimask, x, t, i):
        def loss(p):
            return jnp.mean((model.apply({"params": p, "bimask": bimask}, x) - t) ** 2)
        lv, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt)
        params = optax.apply_updates(params, upd)
        key = jax.random.fold_in(jax.random.key(3), i)
        bimask = bf.maybe_refresh(key, model, {"params": params, "bimask": bimask}, i)
        return params, opt, bimask, lv, g

    def run(jitted, put_batch, put_state):
        params, bimask = put_state(v["params"]), put_state(v["bimask"])
        opt = put_state(tx.init(v["params"]))
        out = []
        for i in range(4):
            params, opt, bimask, lv, g = jitted(params, opt, bimask, put_batch(x), put_batch(t),
                                                jnp.int32(i))
            out.append((lv, g, bimask))
        return out

    single = run(jax.jit(step), lambda a: a, lambda a: a)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    par_step = jax.jit(step, in_shardings=(rep, rep, rep, shard, shard, rep),
                       out_shardings=(rep, rep, rep, rep, rep))
    parallel = run(par_step, lambda a: jax.device_put(a, shard), lambda a: jax.device_put(a, rep))

    changed = 0
    for (l1, g1, b1), (l2, g2, b2) in zip(single, parallel):
        np.testing.assert_allclose(l1, l2, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        for name in ("conv1", "conv2", "fc"):
            p1, p2 = b1[name]["perm"], b2[name]["perm"]
            np.testing.assert_array_equal(p1, p2)
            assert len(p2.sharding.device_set) == 2 and p2.sharding.is_fully_replicated
            shards = [np.asarray(s.data) for s in p2.addressable_shards]
            assert len(shards) == 2
            np.testing.assert_array_equal(shards[0], shards[1])
            changed += int((np.asarray(p1) != np.arange(p1.shape[0])).any())
    assert changed > 0, "no refresh changed a permutation: the test would not see a divergence"

    # nnx: the same check with nnx.jit, nnx.Optimizer(wrt=nnx.Param) and BimaskState
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(8, 32, rngs=rngs)
            self.fc2 = nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.fc1(x)))

    xn, tn = x.mean((1, 2))[:, :4].repeat(2, axis=1), t

    def run_nnx(sharded):
        model = bf.sparse(MLP(nnx.Rngs(0)), num_candidates=20, refresh_every=2)
        opt = nnx.Optimizer(model, optax.sgd(0.3), wrt=nnx.Param)

        @nnx.jit
        def nstep(model, opt, x, t, i):
            lv, g = nnx.value_and_grad(lambda mdl: jnp.mean((mdl(x) - t) ** 2))(model)
            opt.update(model, g)
            key = jax.random.fold_in(jax.random.key(3), i)
            nnx.update(model, bf.maybe_refresh(key, model, None, i))
            return lv

        xs, ts = xn, tn
        if sharded:
            xs, ts = jax.device_put(xn, shard), jax.device_put(tn, shard)
            nnx.update((model, opt), jax.device_put(nnx.state((model, opt)), rep))
        losses = [float(nstep(model, opt, xs, ts, jnp.int32(i))) for i in range(4)]
        return losses, model.fc1.dot_general.perm[...]

    (l1, p1), (l2, p2) = run_nnx(False), run_nnx(True)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_array_equal(p1, p2)
    assert (np.asarray(p1) != np.arange(32)).any()
    shards = [np.asarray(s.data) for s in p2.addressable_shards]
    assert len(shards) == 2 and p2.sharding.is_fully_replicated
    np.testing.assert_array_equal(shards[0], shards[1])
    print(json.dumps({"ok": True, "changed": changed}))
    """
)


@pytest.mark.slow
def test_two_device_data_parallel_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert '"ok": true' in res.stdout
