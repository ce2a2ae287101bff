"""train/lm.py on a (data, fsdp, model) mesh of 8 host devices (subprocesses, so XLA_FLAGS does
not leak into other tests):

* losses, gradients, masks and permutations after a few Bi-Mask steps on meshes (2, 2, 2) and
  (4, 1, 2) equal the single-device run (float tolerance; masks and permutations exactly);
* parameters and AdamW moments are sharded as the layout says (FSDP + tensor parallel);
* the train step has no JAX effect (it keeps the C++ dispatch path), and the compiled train step
  of the sparse model has no collective the dense model's step lacks,
  except (Bi-Mask) the candidates' score sums of the row-parallel searches (listed; none may have
  the shape of a kernel, mask or activation) and, in the refresh branch, the gather of a kernel over
  fsdp that the forward pass also does;
* a checkpoint written on one mesh resumes on another and continues exactly.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent(
    """
    import json, tempfile
    from collections import Counter
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from flax import nnx
    from train import lm, loop, text_data
    from train.checkpoint import Checkpointer
    from train.models import gpt

    assert jax.device_count() == 8, jax.devices()
    GCFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    TOKENS = np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)

    def trainer(shape, method="bimask", search="random"):
        args = lm.build_parser().parse_args([
            "--data", "unused", "--method", method, "--search", search, "--batch-size", "8",
            "--refresh-every", "2", "--num-candidates", "8", "--search-iterations", "4",
            "--perm-blocks", "2", "--steps", "6", "--warmup-steps", "1", "--lr", "1e-2",
            "--fast-compile"])
        return lm.Trainer(args, GCFG, lm.make_mesh(shape))

    def batch(tr, s):
        return tr.put_batch(text_data.batch_at(TOKENS, seed=0, step=s, batch_size=8,
                                               block_size=16))

    def train(tr, st, start, stop):
        losses = []
        for s in range(start, stop):
            st, met = tr.train_step(st, batch(tr, s))
            losses.append(float(met["loss"]))
        return st, losses

    def perms(st):
        return {"/".join(map(str, p[:-2])): np.asarray(v[...])
                for p, v in nnx.to_flat_state(st["bimask"]) if p[-1] == "perm"}
    """
)

EQUALITY = PRELUDE + textwrap.dedent(
    """
    results = {}
    for shape in [(1, 1, 1), (2, 2, 2), (4, 1, 2)]:
        tr = trainer(shape)
        st, losses = train(tr, tr.init_state, 0, 4)  # refreshes at steps 0 and 2
        loss, grads = jax.jit(tr.grads)(st, batch(tr, 4))  # step 4: a refresh is due again
        masks = jax.jit(tr.masks)(st)
        results[shape] = dict(losses=losses, loss=float(loss), perms=perms(st),
                              grads={"/".join(map(str, p)): np.asarray(v[...])
                                     for p, v in nnx.to_flat_state(grads)},
                              masks={k: (np.asarray(f), np.asarray(b)) for k, (f, b) in masks.items()})
        if shape == (2, 2, 2):
            qkv = st["params"]["h0"]["attn"]["qkv"]["kernel"][...]
            assert qkv.sharding.spec == P("fsdp", "model"), qkv.sharding
            down = st["params"]["h1"]["mlp"]["down"]["kernel"][...]
            assert down.sharding.spec == P("model", "fsdp"), down.sharding
            mu = st["opt"][1][0].mu["h0"]["attn"]["qkv"]["kernel"][...]
            assert mu.sharding.is_equivalent_to(qkv.sharding, 2), mu.sharding
            assert len(qkv.addressable_shards[0].data.reshape(-1)) == qkv.size // 4
            p = st["bimask"]["h0"]["attn"]["qkv"]["dot_general"]["perm"][...]
            assert p.sharding.spec == P("model"), p.sharding

    ref = results[(1, 1, 1)]
    changed = 0
    for shape in [(2, 2, 2), (4, 1, 2)]:
        got = results[shape]
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-5)
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-5)
        assert got["grads"].keys() == ref["grads"].keys()
        for k in ref["grads"]:
            np.testing.assert_allclose(got["grads"][k], ref["grads"][k], rtol=2e-4, atol=2e-6,
                                       err_msg=k)
        assert got["perms"].keys() == ref["perms"].keys() and len(ref["perms"]) == 8
        for k in ref["perms"]:
            np.testing.assert_array_equal(got["perms"][k], ref["perms"][k], err_msg=k)
        for k in ref["masks"]:
            np.testing.assert_array_equal(got["masks"][k][0], ref["masks"][k][0], err_msg=k)
            np.testing.assert_array_equal(got["masks"][k][1], ref["masks"][k][1], err_msg=k)
    from bimask_jax.blocked_permutation import is_block_diagonal
    for k, p in ref["perms"].items():
        changed += int((p != np.arange(p.size)).any())
        if k.endswith(("qkv", "up")):
            assert is_block_diagonal(p, 2), k
    assert changed >= 4, "too few refreshes changed a permutation for the test to see a divergence"
    print(json.dumps({"ok": True, "changed": changed}))
    """
)

COLLECTIVES = PRELUDE + textwrap.dedent(
    """
    OPS = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
    PAT = re.compile(r"=\\s*(.+?)\\s+(" + OPS + r")(?:-start)?\\(")

    def collectives(method, search):
        tr = trainer((2, 2, 2), method, search)
        st = tr.init_state
        jitted = jax.jit(tr._train_step, in_shardings=(tr.shardings, tr.batch_sharding),
                         out_shardings=(tr.shardings, tr.repl))
        # No effect (e.g. a checkify report) in the step: it would leave JAX's C++ dispatch path.
        effects = jax.make_jaxpr(jitted)(st, batch(tr, 0)).effects
        assert not effects, (method, search, effects)
        text = jitted.lower(st, batch(tr, 0)).compile(loop.FAST_COMPILE).as_text()
        found = Counter()
        for line in text.splitlines():
            mt = PAT.search(line)
            if mt:
                shape = re.sub(r"\\{[^}]*\\}|/\\*[^*]*\\*/", "", mt.group(1))
                found[(mt.group(2), shape)] += 1
        return found

    def nbytes(shape):
        size = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1, "s8": 1}
        total = 0
        for dt, dims in re.findall(r"(f32|s32|u32|bf16|pred|s8)\\[([0-9,]*)\\]", shape):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * size[dt]
        return total

    dense = collectives("dense", "random")
    out = {"dense": sorted(f"{k[0]} {k[1]} x{v}" for k, v in dense.items())}
    for method, search in [("srste", "random"), ("bimask", "random"), ("bimask", "stripe")]:
        found = collectives(method, search)
        # New kinds/sizes: collectives of a kind and size the dense step does not have at all.
        new = {k: v for k, v in found.items() if k not in dense}
        # More of a kind and size the dense step has (the refresh, in its lax.cond branch, gathers
        # a kernel over fsdp as the forward pass does: executed on refresh steps only).
        more = {k: v - dense[k] for k, v in found.items() if k in dense and v > dense[k]}
        out[f"{method}-{search}"] = {
            "new": sorted(f"{k[0]} {k[1]} x{v} ({nbytes(k[1])} B)" for k, v in new.items()),
            "more_of_dense": sorted(f"{k[0]} {k[1]} +{v}" for k, v in more.items())}
        if method == "srste":
            assert not new and not more, (new, more)
        for op, shape in new:
            # Score sums only: every kernel, mask, gradient and activation of this model has an
            # axis of the width 32; the search's score tables (candidates; stripe: group pairs x
            # 4^m row patterns) do not.
            dims = [d for grp in re.findall(r"\\[([0-9,]*)\\]", shape) for d in grp.split(",")]
            assert op == "all-reduce" and "32" not in dims, (op, shape)
            assert nbytes(shape) <= 4 * max(8, (128 // 8) * 4 ** 4), (op, shape)
        for op, shape in more:
            assert op == "all-gather", (op, shape)
    print(json.dumps({"ok": True, "extra": out}))
    """
)

RESUME = PRELUDE + textwrap.dedent(
    """
    tr1 = trainer((1, 1, 1))
    full, ref_losses = train(tr1, tr1.init_state, 0, 4)
    tr_a = trainer((2, 2, 2))
    st, first = train(tr_a, tr_a.init_state, 0, 2)
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(d)
        lm.save_checkpoint(ck, st, {"mesh": [2, 2, 2]})
        ck.wait()
        tr_b = trainer((4, 1, 2))
        restored, meta = lm.restore_checkpoint(Checkpointer(d), tr_b.init_state)
    assert meta["mesh"] == [2, 2, 2] and int(restored["step"]) == 2
    qkv = restored["params"]["h0"]["attn"]["qkv"]["kernel"][...]
    assert qkv.sharding.mesh.shape["data"] == 4, qkv.sharding
    st2, second = train(tr_b, restored, 2, 4)
    np.testing.assert_allclose(first + second, ref_losses, rtol=2e-5)
    for k, p in perms(full).items():
        np.testing.assert_array_equal(perms(st2)[k], p, err_msg=k)
    print(json.dumps({"ok": True, "losses": first + second}))
    """
)


def _run(script):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True,
                         text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1]
    out = json.loads(line)
    assert out["ok"]
    return out


@pytest.mark.slow
def test_meshes_match_single_device():
    _run(EQUALITY)


@pytest.mark.slow
def test_sparse_step_adds_no_collective_but_score_sums():
    out = _run(COLLECTIVES)
    print(json.dumps(out["extra"], indent=1))  # listed in train/LM.md


@pytest.mark.slow
def test_checkpoint_resumes_on_another_mesh():
    _run(RESUME)
