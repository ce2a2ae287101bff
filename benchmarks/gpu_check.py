"""First GPU contact (issue 16): one script that checks and measures what only a GPU can show.

Items, each run in its own subprocess with its own timeout (a failing or hanging item does not stop
the others), each printing a section and writing ``<results>/<item>.json``:

1. ``env``            device, JAX/jaxlib/CUDA/driver versions, package versions; a trivial Pallas
                      kernel lowered (and on a GPU run and checked) through Triton and Mosaic GPU.
2. ``tests``          ``pytest tests/test_pallas_gpu.py tests/test_pallas_hopper.py -rs`` (the
                      compiled kernels against the XLA products; Hopper lowering and packing).
   ``sm90_discover``  the 4-launch discovery of the Hopper ``wgmma.sp`` metadata layout (A = 1,
                      B = I, base-6-coded metadata words): says CONFIRMED if the derived layout of
                      ``pack_sm90_metadata`` is the hardware's, else which (thread, nibble) fed
                      each (row, chunk).
3. ``kernels``        ``benchmarks/kernels.py`` at ResNet-50, DeiT-S and GPT-2 MLP GEMM shapes:
                      XLA dense vs our spmm, backward-data, re-sparsify and the Hopper kernel.
4. ``step``           ``benchmarks/step.py``: jitted train step, Bi-Mask vs dense (unwrapped), for
                      ResNet-50 (batch 128, bf16) and DeiT-S (XLA products): ratio, masks' share.
5. ``train``          100 steps (one epoch) of ``train/imagenet.py`` (ResNet-50, Bi-Mask, bf16) on a
                      synthetic ImageFolder of random JPEGs written on the machine; img/s.

Item status: ``ok`` (ran, its checks passed), ``failed`` (ran, a check failed: a test, a numeric
check, the layout not confirmed), ``timeout`` (killed; ``partial_result`` keeps the rows measured
before), ``error`` (crashed: see ``output``), ``skipped`` (no budget left).

Then ``<results>/summary.json`` and a summary table (printed last, so that the end of the output
holds it). The items share one wall-clock budget (``--budget-s``, default 470 s on a GPU): each
item is guaranteed its own share, and time an item leaves unused passes to the later ones.

**On the lent H200** (device tool; Python 3.12 with its own JAX/CUDA/flax/optax/triton/torch/PIL,
no package index, our package not installed). ``grain`` (the training data loader), with
``array-record`` and ``portpicker``, is not there: carry them as wheels. Once, in the session's
checkout (the repo the device tool sends), before the call::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        grain==0.2.18 array-record==0.8.6 portpicker==1.6.0

Then the device tool's ``run`` with::

    command: bash benchmarks/gpu_check.sh --results $OUT
    carry: [".whl"]
    timeout_s: 540

(``gpu_check.sh`` installs ``.whl/*.whl`` into /tmp/site if present, sets PYTHONPATH to the repo
root, runs this script and tees its output to ``$OUT/gpu_check.log``: 7 JSON files + the log = 8
files, the most the tool brings back.) The machine's start (1-2 min) plus this call (at most
~8.5 min) leaves about 4 of the 15 device minutes: fetch the files, then rerun only what failed on
the still-warm machine (it stays 30 s after a call), with a budget to match, e.g.::

    command: bash benchmarks/gpu_check.sh --results $OUT --only kernels,train --budget-s 200
    carry: [".whl"]
    timeout_s: 240

Then copy the files into ``benchmarks/results/gpu/``. The compilation cache
(``--cache-dir``, default /tmp/bimask_gpu_check_jax_cache on a GPU) makes a rerun on the same warm
machine skip recompiles.

**On a CPU** (``--dry-run``): the same items at toy sizes, Pallas kernels in interpret mode, the
Hopper kernel replaced by a jnp stand-in (its real lowering is still checked), a few steps, the
same code paths as on the GPU (kernels.py / step.py / train/imagenet.py with other sizes; ResNet-18
instead of ResNet-50 in ``train``, float32 instead of bf16 in ``step``, to keep XLA:CPU's compiles
short). About 110 s of CPU time (3 to 4 minutes of wall time on a loaded 2-core machine);
``tests/test_gpu_check.py`` (slow) asserts every item comes back ok, so that the GPU run does not
fail on a typo::

    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run --results /tmp/gpu_check_dry
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ITEMS = ("env", "tests", "sm90_discover", "kernels", "step", "train")
TITLES = {
    "env": "1. environment: device, versions, Triton / Mosaic GPU lowering",
    "tests": "2. pytest tests/test_pallas_gpu.py tests/test_pallas_hopper.py -rs",
    "sm90_discover": "2b. Hopper wgmma.sp metadata layout: 4-launch discovery",
    "kernels": "3. benchmarks/kernels.py: dense vs spmm / bwd-data / re-sparsify / sm90",
    "step": "4. benchmarks/step.py: Bi-Mask vs dense train step (XLA products)",
    "train": "5. train/imagenet.py: 100 steps on synthetic ImageFolder data",
}
# Seconds each item is guaranteed (GPU, then dry run); unused time passes to later items.
OWN_S = {"env": 30, "tests": 80, "sm90_discover": 30, "kernels": 100, "step": 100, "train": 110}
OWN_S_DRY = {"env": 60, "tests": 90, "sm90_discover": 60, "kernels": 120, "step": 180,
             "train": 180}
BUDGET_S, BUDGET_S_DRY = 470, 900

# kernels.py shapes on the GPU, most wanted first (a timeout keeps the rows done so far)
KERNEL_SHAPES = ("gpt2.fc1", "deit_s.fc1", "r50.s3.3x3", "r50.s4.3x3", "deit_s.fc2", "r50.s2.3x3",
                 "deit_s.qkv", "gpt2.fc2", "r50.s3.downsample")
TRAIN_STEPS, TRAIN_BATCH = 100, 64
OUTPUT_KEEP = 200_000  # characters of an item's output kept in its JSON


# ------------------------------------------------------------------------------ the parent


def allot(own: dict, order: list[str], i: int, left: float) -> float:
    """Timeout of item ``order[i]`` with ``left`` seconds of budget: its own share plus whatever
    the later items' own shares leave, never more than ``left``."""
    later = sum(own[n] for n in order[i + 1:])
    return min(left, max(own[order[i]], left - later))


def _stream(proc, sink: list[str], prefix: str):
    for line in iter(proc.stdout.readline, ""):
        sink.append(line)
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
    proc.stdout.close()


def run_child(cmd: list[str], timeout: float, env: dict, prefix: str = "  ") -> dict:
    """Run ``cmd`` in its own process group, echoing its output; kill the group at ``timeout``.
    Returns returncode (None on timeout), seconds, timed_out, output."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=_stream, args=(proc, lines, prefix), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    out = "".join(lines)
    return dict(returncode=None if timed_out else proc.returncode, timed_out=timed_out,
                seconds=round(time.time() - t0, 1), output=out[-OUTPUT_KEEP:])


def status_of(run: dict, child: dict | None) -> str:
    """ok: ran and its checks passed; failed: ran, a check failed; timeout; error: crashed."""
    if run["timed_out"]:
        return "timeout"
    if child is None or run["returncode"] != 0:
        return "error"
    return "ok" if child.get("ok") else "failed"


def run_items(items: list[tuple[str, list[str]]], own: dict, budget: float, results: Path,
              env: dict | None, titles: dict | None = None, workdir: Path | None = None,
              min_s: float = 5.0) -> list[dict]:
    """Run each ``(name, cmd)`` in turn under the shared budget; ``cmd`` is expected to write
    ``<workdir>/<name>.child.json`` ({"ok": bool, "result": ...}) and may leave a partial result
    in ``<workdir>/<name>/<name>.partial.json`` (kept if the child dies before its final JSON).
    An item left less than ``min_s`` seconds is skipped. Writes ``results/<name>.json``; returns
    the records."""
    results.mkdir(parents=True, exist_ok=True)
    workdir = workdir or results
    order = [n for n, _ in items]
    t_start, records = time.time(), []
    for i, (name, cmd) in enumerate(items):
        left = budget - (time.time() - t_start)
        timeout = allot(own, order, i, left)
        title = (titles or {}).get(name, name)
        print(f"\n{'=' * 100}\n=== {title}\n=== item {name}: timeout {timeout:.0f} s "
              f"({left:.0f} s of the budget left)\n{'=' * 100}", flush=True)
        child_path = workdir / f"{name}.child.json"
        partial_path = workdir / name / f"{name}.partial.json"
        for p in (child_path, partial_path):
            p.unlink(missing_ok=True)
        if timeout < min_s:
            run = dict(returncode=None, timed_out=False, seconds=0.0, output="")
            rec = dict(item=name, title=title, status="skipped",
                       reason="no time left in the budget", result=None)
        else:
            run = run_child(cmd, timeout, env)
            child = None
            if child_path.exists():
                try:
                    child = json.loads(child_path.read_text())
                except ValueError as e:
                    run["output"] += f"\n[gpu_check] unreadable {child_path}: {e}"
            rec = dict(item=name, title=title, status=status_of(run, child),
                       result=child.get("result") if child else None)
            if child is None and partial_path.exists():
                try:
                    rec["partial_result"] = json.loads(partial_path.read_text())
                except ValueError:
                    pass
        rec.update(seconds=run["seconds"], timeout_s=round(timeout, 1),
                   returncode=run["returncode"], command=" ".join(cmd), output=run["output"])
        (results / f"{name}.json").write_text(json.dumps(rec, indent=1, default=str))
        print(f"=== item {name}: {rec['status'].upper()} in {run['seconds']:.1f} s", flush=True)
        records.append(rec)
    return records


# ------------------------------------------------------------------------------ helpers


def write_child(ctx, ok: bool, result: dict):
    Path(ctx.out).write_text(json.dumps(dict(ok=bool(ok), result=result), indent=1,
                                        default=str))


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def set_cache(cache_dir: str):
    """Persistent compilation cache (a rerun on the same machine skips recompiles)."""
    if cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# ----------------------------------------------------------------------- 1. environment


def _trivial_kernels():
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    out = jax_shape((256,), jnp.float32)

    def triton(x):
        from jax.experimental.pallas import triton as pltr

        return pl.pallas_call(body, out_shape=out, compiler_params=pltr.CompilerParams())(x)

    def mosaic_gpu(x):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        return pl.pallas_call(body, out_shape=out, compiler_params=plgpu.CompilerParams())(x)

    return {"triton": (triton, "__gpu$xla.gpu.triton"), "mosaic_gpu": (mosaic_gpu, "mosaic_gpu")}


def jax_shape(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype)


def item_env(ctx):
    import jax
    import jax.numpy as jnp
    import numpy as np

    gpu = on_gpu()
    info = dict(python=platform.python_version(), machine=platform.machine(),
                jax=jax.__version__, jaxlib=_version("jaxlib"), backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()],
                device_kind=jax.devices()[0].device_kind, device_count=jax.device_count())
    info["packages"] = {p: _version(p) for p in (
        "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "numpy",
        "triton", "jax-triton", "torch", "pillow", "grain", "array-record", "scikit-learn",
        "pytest")}
    cuda = {}
    try:
        from jax._src.lib import cuda_versions as cv

        if cv is not None:
            for fn in ("cuda_runtime_get_version", "cuda_runtime_build_version",
                       "cuda_driver_get_version", "cudnn_get_version", "cudnn_build_version",
                       "cublas_get_version", "cusparse_get_version", "cufft_get_version",
                       "cusolver_get_version", "cupti_get_version", "nvcc_get_version"):
                try:
                    cuda[fn] = getattr(cv, fn)()
                except Exception as e:  # report, never hide
                    cuda[fn] = f"{type(e).__name__}: {e}"[:120]
            try:
                cuda["compute_capability"] = cv.cuda_compute_capability(0)
            except Exception as e:
                cuda["compute_capability"] = f"{type(e).__name__}: {e}"[:120]
    except ImportError as e:
        cuda["error"] = str(e)
    info["cuda"] = cuda
    try:
        info["environment_info"] = jax.print_environment_info(return_string=True)
    except Exception as e:
        info["environment_info"] = f"{type(e).__name__}: {e}"
    if gpu:
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,"
                 "clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu",
                 "--format=csv"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"{type(e).__name__}: {e}"
    print(json.dumps({k: v for k, v in info.items() if k != "environment_info"}, indent=1))

    pallas = {}
    x = jnp.arange(256, dtype=jnp.float32)
    for name, (fn, needle) in _trivial_kernels().items():
        r = {}
        try:
            text = jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",)).as_text()
            r["lowers_for_cuda"] = needle in text
            if not r["lowers_for_cuda"]:
                r["error"] = f"{needle!r} not in the lowered module"
        except Exception as e:
            r["lowers_for_cuda"] = False
            r["error"] = f"{type(e).__name__}: {e}"[:500]
        if gpu and r["lowers_for_cuda"]:
            try:
                y = np.asarray(jax.block_until_ready(jax.jit(fn)(x)))
                r["runs"] = bool(np.array_equal(y, np.asarray(x) + 1.0))
                if not r["runs"]:
                    r["error"] = "wrong result"
            except Exception as e:
                r["runs"] = False
                r["error"] = f"{type(e).__name__}: {e}"[:500]
        pallas[name] = r
        print(f"pallas {name}: {r}", flush=True)
    info["pallas"] = pallas
    ok = all(r["lowers_for_cuda"] and (r.get("runs", True) or not gpu) for r in pallas.values())
    ok = ok and (gpu or ctx.dry_run)
    write_child(ctx, ok, info)


# ------------------------------------------------------------------------------ 2. tests

TEST_FILES = ("tests/test_pallas_gpu.py", "tests/test_pallas_hopper.py")


def parse_junit(path: Path) -> list[dict]:
    import xml.etree.ElementTree as ET

    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or el.text or "")[:1000]
                break
        rows.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                         seconds=float(case.get("time") or 0), message=message))
    return rows


def item_tests(ctx):
    missing = [f for f in TEST_FILES if not (ROOT / f).exists()]
    xml = Path(ctx.workdir) / "pytest.xml"
    # -v: one line per test as it ends, so a run killed by the item's timeout still shows which
    # passed (the JUnit file is written only at the end); per-test timeout where the plugin is
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-rs", "-v", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    try:
        import pytest_timeout  # noqa: F401

        cmd.append("--timeout=60")
    except ImportError:
        pass
    print(" ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    rows = parse_junit(xml) if xml.exists() else []
    counts = {o: sum(r["outcome"] == o for r in rows)
              for o in ("passed", "failed", "error", "skipped")}
    gpu_rows = [r for r in rows if "test_pallas_gpu" in r["test"]]
    gpu_all_ran = bool(gpu_rows) and all(r["outcome"] == "passed" for r in gpu_rows)
    ok = rc == 0 and not missing and (ctx.dry_run or gpu_all_ran)
    write_child(ctx, ok, dict(returncode=rc, missing=missing, counts=counts, tests=rows,
                              gpu_tests_all_passed=gpu_all_ran))


# ------------------------------------------------------------- 2b. sm90 layout discovery

PAIRS = tuple((a, b) for a in range(4) for b in range(4) if a < b)  # the 6 valid 2:4 pairs


def supplier(t: int) -> int:
    """Index s of the thread that supplies metadata in our words: lane = 4g + 2d + h of warp w
    gives s = 2 (8w + g) + h; the d = 1 lanes carry copies of their d = 0 partner."""
    return 2 * (t // 4) + t % 2


def discovery_words(digit: int):
    """uint32 (128,): nibble p of thread t's word codes, in base 6 (one of the 6 valid pairs),
    digit ``digit`` of the number 8 s + p, s = supplier(t). Four launches (digits 0..3) give
    each of the 512 (s, p) slots a distinct 4-digit code."""
    import numpy as np

    nib = [a | (b << 2) for a, b in PAIRS]
    out = np.zeros(128, np.uint32)
    for t in range(128):
        s = supplier(t)
        out[t] = sum(nib[((8 * s + p) // 6 ** digit) % 6] << (4 * p) for p in range(8))
    return out


def decode_discovery(outs):
    """outs: the 4 results (64, 32) of one k32 step (A values 1, B = I) for digits 0..3.
    Returns src (64, 8) int: 8 s + p of the (thread, nibble) that fed row r, 4-chunk c; -1 where
    some launch gave no valid 2-of-4 pattern."""
    import numpy as np

    lut = {(1 << a) | (1 << b): i for i, (a, b) in enumerate(PAIRS)}
    src = np.zeros((64, 8), np.int64)
    bad = np.zeros((64, 8), bool)
    for j, d in enumerate(outs):
        bits = ((np.asarray(d, np.float32).reshape(64, 8, 4) > 0.5)
                * (1 << np.arange(4))).sum(-1)
        code = np.vectorize(lambda v: lut.get(int(v), -1))(bits)
        bad |= code < 0
        src += np.maximum(code, 0) * 6 ** j
    return np.where(bad, -1, src)


def derived_src():
    """What ``pack_sm90_metadata`` assumes: row r, chunk c is nibble p = 4 (r % 16 // 8) + c % 4
    of thread s = 2 (8 (r // 16) + r % 8) + c // 4."""
    import numpy as np

    r, c = np.arange(64)[:, None], np.arange(8)[None, :]
    return 8 * (2 * (8 * (r // 16) + r % 8) + c // 4) + 4 * ((r % 16) // 8) + c % 4


def discover_layout(kernel) -> dict:
    """Run the discovery with ``kernel(a_values (64, 64) bf16, words (1, 4, 128) uint32,
    b (128, 128) bf16) -> (64, 128) f32`` (``spmm_t_sm90`` at tiles 64 x 128 x 128)."""
    import jax.numpy as jnp
    import numpy as np

    ones = jnp.ones((64, 64), jnp.bfloat16)
    eye = jnp.eye(128, dtype=jnp.bfloat16)
    outs = [np.asarray(kernel(ones, jnp.asarray(np.tile(discovery_words(j), (1, 4, 1))), eye))
            for j in range(4)]
    want = derived_src()
    steps = []
    for ks in range(4):
        src = decode_discovery([o[:, 32 * ks:32 * ks + 32] for o in outs])
        s, p = np.divmod(src, 8)
        wrong = np.argwhere(src != want)
        steps.append(dict(k_step=ks, confirmed=bool(len(wrong) == 0),
                          invalid=int((src < 0).sum()), mismatches=int(len(wrong)),
                          first_mismatches=[
                              dict(row=int(r), chunk=int(c), thread=int(s[r, c]),
                                   nibble=int(p[r, c]), derived_thread=int(want[r, c] // 8),
                                   derived_nibble=int(want[r, c] % 8))
                              for r, c in wrong[:16]],
                          thread=s.tolist(), nibble=p.tolist()))
    return dict(confirmed=all(x["confirmed"] for x in steps), steps=steps)


def reference_sm90_kernel(a_values, words, b, **tiles):
    """jnp stand-in for ``spmm_t_sm90`` that follows the derived layout (dry runs only)."""
    import jax.numpy as jnp

    from pallas_kernels import decompress
    from pallas_kernels.hopper_sparse import unpack_sm90_metadata

    a = decompress(a_values, unpack_sm90_metadata(words), axis=1)
    return jnp.dot(a.astype(jnp.float32), jnp.asarray(b).astype(jnp.float32).T)


def item_sm90_discover(ctx):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import hopper_sparse

    tiles = dict(tile_m=64, tile_n=128, tile_k=128)
    res = {}
    # the real kernel at this shape must lower for cuda (on any machine)
    try:
        text = jax.jit(lambda a, w, b: hopper_sparse.spmm_t_sm90(a, w, b, **tiles)).trace(
            jax_shape((64, 64), jnp.bfloat16), jax_shape((1, 4, 128), jnp.uint32),
            jax_shape((128, 128), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
        res["lowers_for_cuda"] = "wgmma.mma_async.sp" in text
    except Exception as e:
        res["lowers_for_cuda"] = False
        res["lower_error"] = f"{type(e).__name__}: {e}"[:500]
    if on_gpu():
        kernel = jax.jit(lambda a, w, b: hopper_sparse.spmm_t_sm90(a, w, b, **tiles))
        res["kernel"] = "pallas_kernels.hopper_sparse.spmm_t_sm90 (on the GPU)"
    else:
        kernel = jax.jit(reference_sm90_kernel)
        res["kernel"] = "jnp stand-in following the derived layout (dry run: checks this code)"
    try:
        res.update(discover_layout(kernel))
    except Exception as e:
        res["confirmed"] = False
        res["error"] = f"{type(e).__name__}: {e}"[:1000]
        traceback.print_exc()
    for st in res.get("steps", []):
        print(f"discover k-step {st['k_step']}: derived layout "
              f"{'CONFIRMED' if st['confirmed'] else 'WRONG'} ({st['mismatches']} of 512 "
              f"(row, chunk) slots differ, {st['invalid']} invalid)")
        for m in st["first_mismatches"][:8]:
            print(f"   row {m['row']} chunk {m['chunk']}: thread {m['thread']} nibble "
                  f"{m['nibble']} (derived: thread {m['derived_thread']} nibble "
                  f"{m['derived_nibble']})")
    ok = res["lowers_for_cuda"] and res.get("confirmed", False)
    write_child(ctx, ok, res)


# ---------------------------------------------------------------------------- 3. kernels


def kernel_shapes_arg() -> str:
    from benchmarks.kernels import deit_small_gemms, gpt2_mlp_gemms, resnet50_gemms

    table = {s[0]: s for s in resnet50_gemms() + deit_small_gemms() + gpt2_mlp_gemms()}
    return ",".join(":".join(map(str, table[n])) for n in KERNEL_SHAPES)


def kernel_summary(rows) -> list[dict]:
    out = []
    for r in rows:
        t, sm = r["ms"], r.get("sm90", {})
        out.append({
            "shape": r["name"], "MKN": [r["M"], r["K"], r["N"]],
            "dense/spmm": r["ratios"]["dense/spmm"],
            "dense_bwd/bwd_best": t["dense_bwd"] / min(t["bwd_xla"], t["bwd_kernel"]),
            "resparsify/spmm": r["ratios"]["resparsify/spmm"],
            "max_rel_err": max(r["checks"]["spmm"], r["checks"]["bwd_xla"],
                               r["checks"]["bwd_kernel"]),
            "resparsify_exact": r["checks"]["resparsify_exact"],
            "sm90_dense/kernel": sm.get("dense_over_kernel"), "sm90_rel_err": sm.get("rel_err"),
            "sm90_probe01_rel_err": sm.get("probe01_rel_err"), "sm90_error": sm.get("error"),
            "torch_dense/2:4": r.get("torch", {}).get("dense_over_sparse"),
        })
    return out


def item_kernels(ctx):
    from benchmarks import kernels

    partial = Path(ctx.workdir) / "kernels.partial.json"  # run_items reads it after a timeout
    if ctx.dry_run:
        from pallas_kernels import hopper_sparse

        hopper_sparse.spmm_t_sm90 = reference_sm90_kernel  # the Mosaic GPU kernel needs a GPU
        argv = ["--interpret", "--models", "", "--shapes", "dry.sm90:8:32:64", "--sm90",
                "--warmup", "1", "--reps", "2", "--no-torch"]
    else:
        argv = ["--models", "", "--shapes", kernel_shapes_arg(), "--warmup", "5", "--reps", "20"]
        # the Hopper kernel is timed unless the discovery run hung (a hang here would cost the
        # whole item); wrong numbers are no reason to skip it (its errors are reported per row)
        disc = Path(ctx.results) / "sm90_discover.json"
        hung = disc.exists() and json.loads(disc.read_text()).get("status") == "timeout"
        if hung:
            print("sm90 discovery timed out: the Hopper kernel is not timed", flush=True)
        else:
            argv.append("--sm90")
    argv += ["--out", str(partial)]
    print("python benchmarks/kernels.py " + " ".join(argv), flush=True)
    rc = kernels.main(argv)
    data = json.loads(partial.read_text())
    summary = kernel_summary(data["rows"])
    ok = rc == 0 and data.get("complete", False)
    if ctx.dry_run:  # the stand-in must make the whole sm90 path run
        ok = ok and all(s["sm90_error"] is None and s["sm90_rel_err"] < 1e-2 for s in summary)
    write_child(ctx, ok, dict(returncode=rc, summary=summary, **data))


# ------------------------------------------------------------------------------- 4. step


def step_summary(res: dict) -> list[dict]:
    """Per model: dense (unwrapped) and Bi-Mask step ms, their ratio, the masks' ms and share."""
    by = {(r["model"], r["variant"]): r for r in res.get("steps", [])}
    summary = []
    for model in ("resnet50", "deit_s"):
        d, b, mk = (by.get((model, v)) for v in ("unwrapped", "bimask", "bimask masks only"))
        if d and b and mk:
            summary.append(dict(model=model, dense_ms=d["step_ms"], bimask_ms=b["step_ms"],
                                bimask_over_dense=b["ratio"], masks_ms=mk["step_ms"],
                                masks_share_of_dense_step=mk["ratio"]))
    return summary


def item_step(ctx):
    from benchmarks import step

    partial = Path(ctx.workdir) / "step.partial.json"
    if ctx.dry_run:
        # float32: XLA:CPU compiles bf16 convolutions about 2x slower (bf16 ran by hand too)
        argv = ["--models", "resnet50,deit_s", "--tiny", "--image-size", "32", "--batch", "2",
                "--dtype", "float32", "--methods", "bimask", "--repeats", "2", "--steps", "1",
                "--refresh-repeats", "0", "--fast-compile"]
    else:
        argv = ["--models", "resnet50,deit_s", "--batch", "128", "--dtype", "bfloat16",
                "--methods", "bimask", "--repeats", "5", "--steps", "5", "--refresh-repeats", "1"]
    argv += ["--json", str(partial)]
    print("python benchmarks/step.py " + " ".join(argv), flush=True)
    res = step.main(argv)
    summary = step_summary(res)
    ok = len(summary) == 2 and all(math.isfinite(s["bimask_over_dense"]) for s in summary)
    write_child(ctx, ok, dict(summary=summary, **res))


# ------------------------------------------------------------------------------ 5. train


def write_image_folder(root: Path, classes: int, train_per_class: int, val_per_class: int,
                       size: tuple[int, int], seed: int = 0) -> dict:
    """Random-noise ImageFolder (``train/`` and ``val/``): JPEG with PIL, else binary PPM (which
    the loader also reads) written with NumPy. Returns counts and seconds."""
    import numpy as np

    try:
        from PIL import Image
    except ImportError:
        Image = None  # noqa: N806
    rng = np.random.default_rng(seed)
    t0 = time.time()
    w, h = size
    n = 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img[..., c % 3] //= 2  # a class-dependent colour shift
                if Image is not None:
                    Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=85)
                else:
                    (d / f"{i:05d}.ppm").write_bytes(f"P6 {w} {h} 255\n".encode() + img.tobytes())
                n += 1
    return dict(images=n, format="jpeg" if Image is not None else "ppm",
                seconds=round(time.time() - t0, 2))


def item_train(ctx):
    work = Path(ctx.workdir)
    if ctx.dry_run:
        steps, batch, classes, size = 3, 4, 2, (24, 20)
        # resnet18 (not the GPU's resnet50) keeps XLA:CPU's compiles short; same script path
        args = ["--arch", "resnet18", "--width-mult", "0.0625", "--image-size", "16",
                "--workers", "1", "--fast-compile"]
    else:
        steps, batch, classes, size = TRAIN_STEPS, TRAIN_BATCH, 4, (96, 80)
        args = ["--arch", "resnet50", "--workers", str(min(12, max(1, (os.cpu_count() or 2) - 2)))]
    data = work / "imagefolder"
    made = write_image_folder(data, classes, steps * batch // classes, 4, size)
    print(f"synthetic ImageFolder: {made}", flush=True)
    run_dir = work / "train_run"
    # one epoch of exactly `steps` steps: no epoch boundary inside the timed steps
    cmd = [sys.executable, "train/imagenet.py", *args, "--method", "bimask", "--dtype",
           "bfloat16", "--data-path", str(data), "--batch-size", str(batch), "--epochs", "1",
           "--log-every", str(max(1, steps // 5)), "--no-progress", "--run-dir", str(run_dir)]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    seconds = round(time.time() - t0, 1)
    lines = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [x for x in lines if x.get("type") == "train"]
    summ = next((x for x in lines if x.get("type") == "summary"), None)
    # the first window after compilation may have no timed step (logged as NaN / null)
    ips = [x["img_per_s"] for x in train if isinstance(x.get("img_per_s"), (int, float))
           and math.isfinite(x["img_per_s"])]
    res = dict(returncode=rc, seconds=seconds, command=" ".join(cmd), data=made, steps=steps,
               batch=batch, img_per_s_windows=ips,
               img_per_s_median=statistics.median(ips) if ips else None,
               final_loss=train[-1]["loss"] if train else None, summary=summ, metrics=lines)
    finite = [isinstance(x.get("loss"), (int, float)) and math.isfinite(x["loss"]) for x in train]
    ok = rc == 0 and summ is not None and summ.get("step") == steps and bool(ips) and all(finite)
    print(f"train: rc {rc}, {len(train)} log lines, img/s windows {ips}", flush=True)
    write_child(ctx, ok, res)


ITEM_FUNCS = {"env": item_env, "tests": item_tests, "sm90_discover": item_sm90_discover,
              "kernels": item_kernels, "step": item_step, "train": item_train}


# ---------------------------------------------------------------------------- summary


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def summarize(records: list[dict]) -> dict:
    """Key numbers per item, and the issue's goals side by side with what was measured."""
    out = {"items": {r["item"]: dict(status=r["status"], seconds=r["seconds"]) for r in records}}
    get = {r["item"]: (r.get("result") or r.get("partial_result") or {}) for r in records}
    env = get.get("env", {})
    if env:
        out["env"] = dict(device=env.get("device_kind"), jax=env.get("jax"),
                          jaxlib=env.get("jaxlib"), cuda=env.get("cuda"),
                          pallas=env.get("pallas"))
    if get.get("tests"):
        out["tests"] = dict(counts=get["tests"].get("counts"),
                            not_passed=[t["test"] for t in get["tests"].get("tests", [])
                                        if t["outcome"] in ("failed", "error")])
    if get.get("sm90_discover"):
        d = get["sm90_discover"]
        out["sm90_discover"] = dict(confirmed=d.get("confirmed"), kernel=d.get("kernel"),
                                    mismatches=[s["mismatches"] for s in d.get("steps", [])],
                                    error=d.get("error"))
    k = get.get("kernels", {})
    rows = k.get("summary") or (kernel_summary(k["rows"]) if k.get("rows") else [])
    if rows:
        out["kernels"] = rows
    if get.get("step") and step_summary(get["step"]):  # a cut-short run keeps its models
        out["step"] = step_summary(get["step"])
        if get["step"].get("refresh_resnet50"):
            out["refresh_resnet50"] = get["step"]["refresh_resnet50"]
    if get.get("train"):
        t = get["train"]
        out["train"] = dict(img_per_s_median=t.get("img_per_s_median"), steps=t.get("steps"),
                            batch=t.get("batch"), seconds=t.get("seconds"),
                            final_loss=t.get("final_loss"))
    return out


def print_summary(s: dict):
    print(f"\n{'=' * 100}\n=== SUMMARY"
          + (" (DRY RUN on the CPU: toy sizes, interpret mode; the times mean nothing)"
             if s.get("dry_run") else "") + f"\n{'=' * 100}")
    for name, it in s["items"].items():
        print(f"{name:14s} {it['status']:8s} {it['seconds']:7.1f} s")
    if "env" in s:
        e = s["env"]
        pal = ", ".join(f"{n}: lowers {r.get('lowers_for_cuda')} runs {r.get('runs', '-')}"
                        for n, r in (e.get("pallas") or {}).items())
        print(f"device {e['device']}, jax {e['jax']}, jaxlib {e['jaxlib']}; {pal}")
    if "tests" in s:
        print(f"tests: {s['tests']['counts']} not passed: {s['tests']['not_passed']}")
    if "sm90_discover" in s:
        d = s["sm90_discover"]
        print(f"sm90 metadata layout: {'CONFIRMED' if d['confirmed'] else 'NOT CONFIRMED'} "
              f"(mismatching slots per k-step {d['mismatches']}; {d['kernel']})"
              + (f" error: {d['error'][:200]}" if d.get("error") else ""))
    if "kernels" in s:
        print("| shape | M K N | dense/spmm | dense_bwd/best bwd | resparsify/spmm | sm90 "
              "dense/kernel (err) | torch dense/2:4 | max err |")
        print("|---|---|---|---|---|---|---|---|")
        for r in s["kernels"]:
            sm = (f"{_f(r['sm90_dense/kernel'])}x ({_f(r['sm90_rel_err'], '{:.1e}')})"
                  if r["sm90_error"] is None else f"error: {r['sm90_error'][:60]}")
            print(f"| {r['shape']} | {' '.join(map(str, r['MKN']))} | {_f(r['dense/spmm'])}x | "
                  f"{_f(r['dense_bwd/bwd_best'])}x | {_f(100 * r['resparsify/spmm'], '{:.0f}')}%"
                  f" | {sm} | {_f(r['torch_dense/2:4'])} | {r['max_rel_err']:.1e} |")
        print("goals: forward and backward-data >= 1.3x dense at the large shapes; "
              "re-sparsify <= 10% of one sparse GEMM")
    if "step" in s:
        for r in s["step"]:
            print(f"step {r['model']}: dense {r['dense_ms']:.1f} ms, bimask {r['bimask_ms']:.1f} "
                  f"ms = {r['bimask_over_dense']:.3f}x (goal <= 1.05x); masks alone "
                  f"{r['masks_ms']:.2f} ms = {100 * r['masks_share_of_dense_step']:.1f}% of the "
                  "dense step")
    if "refresh_resnet50" in s:
        r = s["refresh_resnet50"]
        print(f"refresh ResNet-50 ({r['layers']} layers, {r['num_candidates']} candidates): "
              f"{r['median_s']:.3f} s median, {1e3 * r['median_s'] / 100:.1f} ms/step over 100")
    if "train" in s:
        t = s["train"]
        print(f"train/imagenet.py: {t['steps']} steps of batch {t['batch']}: median "
              f"{_f(t['img_per_s_median'], '{:.0f}')} img/s, final loss "
              f"{_f(t['final_loss'], '{:.3f}')}, {t['seconds']} s in all")


# ------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "gpu"),
                    help="directory for <item>.json and summary.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU smoke run: toy sizes, interpret-mode kernels, a few steps")
    ap.add_argument("--only", default="", help=f"comma list of items ({', '.join(ITEMS)})")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"wall-clock budget of all items (default {BUDGET_S} s on a GPU, "
                         f"{BUDGET_S_DRY} s with --dry-run)")
    ap.add_argument("--cache-dir", default=None,
                    help="JAX compilation cache ('' for none; default "
                         "/tmp/bimask_gpu_check_jax_cache, none with --dry-run)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--item", choices=ITEMS, help=argparse.SUPPRESS)  # internal: run one item
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cache = a.cache_dir if a.cache_dir is not None else (
        "" if a.dry_run else "/tmp/bimask_gpu_check_jax_cache")

    if a.item:  # child process: one item
        a.workdir = a.workdir or tempfile.mkdtemp(prefix=f"gpu_check_{a.item}_")
        set_cache(cache)
        ITEM_FUNCS[a.item](a)
        return 0

    names = [n for n in a.only.split(",") if n] or list(ITEMS)
    unknown = sorted(set(names) - set(ITEMS))
    if unknown:
        ap.error(f"--only: unknown items {unknown} (known: {', '.join(ITEMS)})")
    names = [n for n in ITEMS if n in names]
    results = Path(a.results)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    own = OWN_S_DRY if a.dry_run else OWN_S
    budget = a.budget_s or (BUDGET_S_DRY if a.dry_run else BUDGET_S)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    if cache:  # for every process below, train/imagenet.py included
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    base = [sys.executable, str(Path(__file__).resolve()), "--cache-dir", cache, "--results",
            str(results.resolve())]
    if a.dry_run:
        base.append("--dry-run")
    items = []
    for n in names:
        item_dir = workdir / n
        item_dir.mkdir(parents=True, exist_ok=True)
        items.append((n, base + ["--item", n, "--out", str(workdir / f"{n}.child.json"),
                                 "--workdir", str(item_dir)]))
    print(f"gpu_check: items {names}, budget {budget:.0f} s, results {results}, workdir "
          f"{workdir}, dry_run={a.dry_run}, python {sys.executable}", flush=True)
    t0 = time.time()
    records = run_items(items, own, budget, results, env, TITLES, workdir)
    s = summarize(records)
    s.update(dry_run=a.dry_run, budget_s=budget, seconds=round(time.time() - t0, 1),
             command=" ".join(["python benchmarks/gpu_check.py",
                               *(sys.argv[1:] if argv is None else argv)]))
    (results / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    print_summary(s)
    print(f"\ntotal {s['seconds']:.0f} s; JSON in {results}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
