"""benchmarks/gpu_check.py: the runner (budget, timeouts, failures do not stop the others), the
Hopper metadata-layout discovery (decoded against simulated devices), and the whole script's CPU
dry run (slow), so that the GPU run does not fail on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


def test_allot_guarantees_later_items_their_share():
    own = {"a": 10, "b": 20, "c": 30}
    order = ["a", "b", "c"]
    assert gc.allot(own, order, 0, 100) == 50  # 100 - (20 + 30)
    assert gc.allot(own, order, 0, 40) == 10  # short budget: still its own share
    assert gc.allot(own, order, 1, 45) == 20
    assert gc.allot(own, order, 2, 12) == 12  # never more than what is left


def _item(workdir, body):
    return [sys.executable, "-c", f"import json, sys, time; out = {str(workdir)!r}; {body}"]


def test_run_items_keeps_going_after_errors_failures_and_timeouts(tmp_path):
    work, res = tmp_path / "work", tmp_path / "res"
    (work / "slow").mkdir(parents=True)
    write = "open(out + '/{n}.child.json', 'w').write(json.dumps({{'ok': {ok}, 'result': {{'x': 1}}}}))"
    items = [
        ("good", _item(work, write.format(n="good", ok=True) + "; print('hello')")),
        ("crash", _item(work, "raise SystemExit('boom')")),
        ("slow", _item(work, "open(out + '/slow/slow.partial.json', 'w').write('{\"rows\": 2}');"
                             " print('started', flush=True); time.sleep(60)")),
        ("bad", _item(work, write.format(n="bad", ok=False))),
    ]
    own = {"good": 10, "crash": 10, "slow": 2, "bad": 10}
    recs = gc.run_items(items, own, budget=13, results=res, env=None, workdir=work, min_s=0.5)
    assert [r["status"] for r in recs] == ["ok", "error", "timeout", "failed"]
    good, crash, slow, _ = recs
    assert good["result"] == {"x": 1} and "hello" in good["output"]
    assert crash["returncode"] == 1 and "boom" in crash["output"]
    assert slow["partial_result"] == {"rows": 2} and "started" in slow["output"]
    assert slow["timeout_s"] < 4 and slow["seconds"] < 10 and slow["returncode"] is None
    for r in recs:  # every item has its JSON, with what ran
        on_disk = json.loads((res / f"{r['item']}.json").read_text())
        assert on_disk["status"] == r["status"] and on_disk["command"]


def test_run_items_skips_items_when_the_budget_is_spent(tmp_path):
    items = [("a", _item(tmp_path, "time.sleep(1.5)")), ("b", _item(tmp_path, "pass"))]
    recs = gc.run_items(items, {"a": 1, "b": 1}, budget=2.0, results=tmp_path, env=None,
                        workdir=tmp_path, min_s=1.0)
    assert [r["status"] for r in recs] == ["timeout", "skipped"]


def test_discovery_confirms_the_derived_layout_on_a_device_that_follows_it():
    res = gc.discover_layout(jax.jit(gc.reference_sm90_kernel))
    assert res["confirmed"] and len(res["steps"]) == 4
    assert all(s["mismatches"] == 0 and s["invalid"] == 0 for s in res["steps"])


def test_discovery_words_give_every_slot_a_distinct_valid_code():
    codes = np.zeros((128, 8), np.int64)
    pairs = {a | (b << 2): i for i, (a, b) in enumerate(gc.PAIRS)}
    for j in range(4):
        w = gc.discovery_words(j)
        for t in range(128):
            for p in range(8):
                codes[t, p] += pairs[int(w[t] >> (4 * p)) & 0xF] * 6**j
    s = np.array([gc.supplier(t) for t in range(128)])
    np.testing.assert_array_equal(codes, 8 * s[:, None] + np.arange(8)[None, :])


def _fake_device(src):
    """A simulated kernel whose row r, 4-chunk c reads nibble src % 8 of (the d = 0 lane of)
    thread src // 8, at every k32 step; A values 1, B = I, so the output is expand(A)."""

    def kernel(a_values, words, b):
        words = np.asarray(words)
        out = np.zeros((64, 128), np.float32)
        for ks in range(words.shape[1]):
            for r in range(64):
                for c in range(8):
                    s, p = divmod(int(src[r, c]), 8)
                    t = 4 * (s // 2) + s % 2
                    nib = int(words[0, ks, t] >> (4 * p)) & 0xF
                    out[r, 32 * ks + 4 * c + (nib & 3)] = 1
                    out[r, 32 * ks + 4 * c + (nib >> 2)] = 1
        return out

    return kernel


def test_discovery_reports_the_mapping_of_a_device_with_another_layout():
    want = gc.derived_src()
    np.testing.assert_array_equal(  # the fake device itself agrees with the derived layout
        np.asarray(gc.discover_layout(_fake_device(want))["steps"][0]["thread"]), want // 8)
    other = want.reshape(4, 2, 8, 8)[:, ::-1].reshape(64, 8)  # the two 8-row halves swapped
    res = gc.discover_layout(_fake_device(other))
    assert not res["confirmed"]
    for st in res["steps"]:
        assert st["mismatches"] == 512 and st["invalid"] == 0
        np.testing.assert_array_equal(np.asarray(st["thread"]), other // 8)
        np.testing.assert_array_equal(np.asarray(st["nibble"]), other % 8)
        m = st["first_mismatches"][0]
        assert (m["thread"], m["nibble"]) == divmod(int(other[m["row"], m["chunk"]]), 8)


def test_kernel_shapes_are_the_issue_shapes():
    shapes = gc.kernel_shapes_arg().split(",")
    assert shapes[0] == "gpt2.fc1:8192:768:3072"  # 8192 tokens x 768 -> 3072, timed first
    names = [s.split(":")[0] for s in shapes]
    assert any(n.startswith("r50.") for n in names) and any(n.startswith("deit_s.") for n in names)


@pytest.mark.slow
def test_dry_run_every_item_comes_back_ok(tmp_path):
    """The whole script on the CPU (toy sizes, interpret mode, stand-in Hopper kernel)."""
    res = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--results", str(res),
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    for item in gc.ITEMS:
        rec = json.loads((res / f"{item}.json").read_text())
        assert rec["status"] == "ok", (item, rec["output"][-3000:])
        assert rec["result"]
    s = json.loads((res / "summary.json").read_text())
    assert s["sm90_discover"]["confirmed"]
    assert s["tests"]["counts"]["failed"] == 0 and s["tests"]["counts"]["passed"] > 0
    assert len(s["kernels"]) == 1 and s["kernels"][0]["sm90_error"] is None
    assert [r["model"] for r in s["step"]] == ["resnet50", "deit_s"]
    assert s["train"]["steps"] == 3 and s["train"]["img_per_s_median"] > 0
    assert "=== SUMMARY" in proc.stdout


def test_summary_keeps_the_rows_of_items_cut_short():
    """A timed-out kernels/step item leaves only its partial JSON: the summary still shows it."""
    row = dict(name="s", M=8, K=32, N=64, ms={"dense": 1.0, "dense_bwd": 1.0, "bwd_xla": 2.0,
                                               "bwd_kernel": 0.5, "spmm": 0.5},
               ratios={"dense/spmm": 2.0, "resparsify/spmm": 0.1},
               checks={"spmm": 1e-3, "bwd_xla": 1e-3, "bwd_kernel": 2e-3, "resparsify_exact": True})
    steps = [dict(model="resnet50", variant="unwrapped", step_ms=100.0, ratio=1.0),
             dict(model="resnet50", variant="bimask", step_ms=104.0, ratio=1.04),
             dict(model="resnet50", variant="bimask masks only", step_ms=2.0, ratio=0.02)]
    recs = [dict(item="kernels", status="timeout", seconds=1.0, result=None,
                 partial_result={"rows": [row]}),
            dict(item="step", status="timeout", seconds=1.0, result=None,
                 partial_result={"steps": steps})]
    s = gc.summarize(recs)
    assert s["items"]["step"]["status"] == "timeout"
    (k,) = s["kernels"]
    assert k["dense_bwd/bwd_best"] == 2.0 and k["max_rel_err"] == 2e-3 and k["sm90_error"] is None
    assert s["step"] == [dict(model="resnet50", dense_ms=100.0, bimask_ms=104.0,
                              bimask_over_dense=1.04, masks_ms=2.0, masks_share_of_dense_step=0.02)]
    gc.print_summary(s)  # prints without error
