"""Per-replica ("ghost") BatchNorm, ``--bn-groups R``: each of R consecutive slices of the batch is
normalised with its own statistics and the running averages follow the first slice (PyTorch's
per-GPU BatchNorm under nn.DataParallel / DDP); R = 1 is flax.linen.BatchNorm as before."""

import os
import subprocess
import sys
import textwrap
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import config
from train.config import apply_recipe, build_parser
from train.models import arch_family, create_model
from train.models.common import BN_EPS, BN_MOMENTUM, GhostBatchNorm, batch_norm


def _data(shape=(8, 3, 3, 5), seed=0):
    """Rows whose groups differ in mean and spread (so per-group and global statistics differ)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    x = x * (1 + np.arange(shape[0]).reshape(-1, *([1] * (len(shape) - 1))) / 2)
    x = x + np.arange(shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    return jnp.asarray(x, jnp.float32)


def _variables(c, seed=1):
    rng = np.random.default_rng(seed)
    f = lambda *a: jnp.asarray(rng.uniform(*a, size=c), jnp.float32)  # noqa: E731
    return {"params": {"scale": f(0.5, 2.0), "bias": f(-1.0, 1.0)},
            "batch_stats": {"mean": f(-0.5, 0.5), "var": f(0.5, 1.5)}}


def _numpy_ghost_bn(x, v, groups):
    """The rule in NumPy (float64): slice r of B/R rows normalised by its own mean and biased
    variance over all but the channel axis; running stats from slice 0 with momentum 0.9."""
    x = np.asarray(x, np.float64)
    scale, bias = (np.asarray(v["params"][k], np.float64) for k in ("scale", "bias"))
    ys, stats = [], []
    for part in np.split(x, groups, axis=0):
        axes = tuple(range(part.ndim - 1))
        mu, var = part.mean(axes), part.var(axes)
        ys.append((part - mu) / np.sqrt(var + BN_EPS) * scale + bias)
        stats.append((mu, var))
    mu0, var0 = stats[0]
    ra_mean = BN_MOMENTUM * np.asarray(v["batch_stats"]["mean"]) + (1 - BN_MOMENTUM) * mu0
    ra_var = BN_MOMENTUM * np.asarray(v["batch_stats"]["var"]) + (1 - BN_MOMENTUM) * var0
    return np.concatenate(ys), ra_mean, ra_var


class _One(nn.Module):
    """One ``batch_norm`` layer as the models call it."""

    groups: int = 1
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        return batch_norm(train, "bn", self.dtype, groups=self.groups)(x)


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("jit", [False, True])
def test_each_group_is_normalised_by_its_own_statistics(groups, jit):
    x = _data()
    v = {k: {"bn": t} for k, t in _variables(5).items()}
    fn = lambda v, x: _One(groups).apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
    y, upd = (jax.jit(fn) if jit else fn)(v, x)
    want, ra_mean, ra_var = _numpy_ghost_bn(x, _variables(5), groups)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], ra_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["bn"]["var"], ra_var, rtol=1e-6, atol=1e-6)
    # Not the global-batch rule: the groups' statistics differ.
    glob, g_mean, _ = _numpy_ghost_bn(x, _variables(5), 1)
    assert np.abs(want - glob).max() > 0.1 and np.abs(ra_mean - g_mean).max() > 0.05


def test_one_group_is_flax_batchnorm_bit_identical():
    x = _data()
    v = _variables(5)
    for train in (True, False):
        mine = batch_norm(train, "bn", jnp.float32, groups=1)
        assert type(mine) is nn.BatchNorm
        flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               dtype=jnp.float32, name="bn")
        a, ua = mine.apply(v, x, mutable=["batch_stats"])
        b, ub = flax_bn.apply(v, x, mutable=["batch_stats"])
        np.testing.assert_array_equal(a, b)
        jax.tree.map(np.testing.assert_array_equal, ua, ub)
    # Evaluation uses Flax's module for every R, and GhostBatchNorm's own eval path equals it.
    assert type(batch_norm(False, "bn", groups=4)) is nn.BatchNorm
    ghost = GhostBatchNorm(groups=4, use_running_average=True).apply(v, x)
    flax_eval = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5).apply(v, x)
    np.testing.assert_array_equal(ghost, flax_eval)
    # GhostBatchNorm with one group: the ordinary BatchNorm (float rounding apart).
    a, ua = GhostBatchNorm(groups=1).apply(v, x, mutable=["batch_stats"])
    b, ub = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5).apply(
        v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-6), ua, ub)


def test_variables_and_dtypes_are_flax_batchnorms():
    x = _data().astype(jnp.bfloat16)
    flax_v = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16).init(jax.random.key(0), x)
    ghost = GhostBatchNorm(groups=2, dtype=jnp.bfloat16)
    ghost_v = ghost.init(jax.random.key(0), x)
    assert jax.tree.structure(ghost_v) == jax.tree.structure(flax_v)
    for p, q in zip(jax.tree.leaves(ghost_v), jax.tree.leaves(flax_v), strict=True):
        np.testing.assert_array_equal(p, q)
        assert p.shape == q.shape == (5,) and p.dtype == q.dtype == jnp.float32
    # Initialising (a training-mode call) does not update the running averages.
    np.testing.assert_array_equal(ghost_v["batch_stats"]["mean"], np.zeros(5))
    np.testing.assert_array_equal(ghost_v["batch_stats"]["var"], np.ones(5))
    y, upd = ghost.apply(ghost_v, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["mean"].dtype == jnp.float32


def test_bad_groups_and_indivisible_batch_are_refused():
    x = _data((6, 2, 2, 3))
    v = {k: {"bn": t} for k, t in _variables(3).items()}
    with pytest.raises(ValueError, match="batch size 6 is not divisible by groups=4"):
        _One(4).apply(v, x, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="batch size 6 is not divisible by groups=4"):
        jax.jit(lambda v, x: _One(4).apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="groups must be an integer >= 1"):
            batch_norm(True, "bn", groups=bad)
        with pytest.raises(ValueError, match="groups must be an integer >= 1"):
            GhostBatchNorm(groups=bad).init(jax.random.key(0), x)
        with pytest.raises(ValueError, match="bn_groups must be an integer >= 1"):
            create_model("resnet8", 10, bn_groups=bad)
    with pytest.raises(ValueError, match="DeiT.*has no BatchNorm"):
        create_model("deit_tiny", 10, bn_groups=2)
    # R dividing B: fine, including R = B (one sample per group).
    _One(6).apply(v, x, train=True, mutable=["batch_stats"])


def _small(arch, groups):
    return create_model(arch, 10, width_mult=0.25, bn_groups=groups).module


def _fill(shapes, seed=0):
    """Variables of the given shapes from NumPy (no jitted random init: slow to compile on CPU)."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        lo, hi = {"['scale']": (0.5, 1.5), "['var']": (0.5, 1.5)}.get(name, (-0.3, 0.3))
        return jnp.asarray(rng.uniform(lo, hi, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def test_model_groups_are_independent_models_on_each_slice():
    """The reference ResNet with R groups on a batch = the 1-group model on each slice of B/R rows
    (every other op is per sample); its running stats = the 1-group model's on the first slice;
    its variables are the 1-group model's for every R (checkpoints interchange)."""
    arch = "resnet8_cifar10"
    x = _data((8, 8, 8, 3))
    shapes = {r: jax.eval_shape(lambda x, r=r: _small(arch, r).init(jax.random.key(0), x,
                                                                     train=False), x[:1])
              for r in (1, 2, 4)}
    assert shapes[1] == shapes[2] == shapes[4]  # structure, shapes and dtypes
    assert set(shapes[1]) == {"params", "batch_stats"}
    v = _fill(shapes[1])
    step = jax.jit(lambda m, v, x: m.apply(v, x, train=True, mutable=["batch_stats"]),
                   static_argnums=0)
    logits, upd = step(_small(arch, 4), v, x)
    parts = [step(_small(arch, 1), v, part) for part in np.split(np.asarray(x), 4)]
    np.testing.assert_allclose(logits, np.concatenate([p[0] for p in parts]), rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 upd, parts[0][1])
    # (With statistics over the whole batch, the slices would not match: the groups of _data
    # differ in mean and spread.)


CNN_ARCHS = ["resnet8", "resnet8_cifar10", "vgg19", "vgg19_cifar10", "mobilenet_v2", "mobilenetv2",
             "tv_resnet18", "resnet18", "tv_resnet50", "resnet50"]


@pytest.mark.parametrize("arch", CNN_ARCHS)
def test_every_batchnorm_of_every_cnn_gets_the_groups(arch):
    """Traced abstractly: with bn_groups=2 every BatchNorm of the network is a 2-group
    GhostBatchNorm in training and a Flax BatchNorm in evaluation (R = 1: Flax's always, see
    test_one_group_is_flax_batchnorm_bit_identical)."""
    x = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
    module = _small(arch, 2)
    seen = []

    def spy(f, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module,
                                                            (nn.BatchNorm, GhostBatchNorm)):
            seen.append((type(context.module).__name__, getattr(context.module, "groups", 1)))
        return f(*args, **kwargs)

    with nn.intercept_methods(spy):
        v = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=True), x)
        train_kinds, seen[:] = list(seen), []
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), v, x)
    n = len(jax.tree.leaves(v["batch_stats"])) // 2  # BatchNorms: a mean and a var each
    assert n > 0
    assert train_kinds == [("GhostBatchNorm", 2)] * n
    assert seen == [("BatchNorm", 1)] * n


def _parse(script, argv):
    cfg = build_parser(script).parse_args(argv)
    return apply_recipe(cfg, arch_family(cfg.arch))


def test_bn_groups_flag_parses_validates_and_is_a_training_setting():
    base = _parse("cifar", [])
    assert base.bn_groups == 1 and _parse("imagenet", []).bn_groups == 1
    cfg = _parse("cifar", ["--bn-groups", "4"])
    assert cfg.bn_groups == 4
    assert _parse("imagenet", ["--arch", "resnet50", "--bn-groups", "8"]).bn_groups == 8
    for bad in ("0", "-1", "2.5", "x"):
        with pytest.raises(SystemExit):
            build_parser("cifar").parse_args(["--bn-groups", bad])
    with pytest.raises(ValueError, match="--batch-size 256 is not divisible by --bn-groups 3"):
        _parse("cifar", ["--bn-groups", "3"])
    with pytest.raises(ValueError, match="--batch-size 100 is not divisible by --bn-groups 8"):
        _parse("imagenet", ["--batch-size", "100", "--bn-groups", "8"])
    with pytest.raises(ValueError, match="--bn-groups 2: DeiT has no BatchNorm"):
        _parse("imagenet", ["--arch", "vit_deit_small_patch16_224", "--bn-groups", "2"])
    from train import cifar

    with pytest.raises(ValueError, match="--bn-groups: must be an integer >= 1"):
        cifar.configure(bn_groups=0)
    assert cifar.configure(bn_groups=2, batch_size=64).bn_groups == 2
    # Compared on --resume; a checkpoint from before the flag reads as R = 1.
    a, b = config.training_settings(base), config.training_settings(cfg)
    assert "bn_groups" not in config.RUN_SETTINGS
    assert config.differences(a, b) == {"bn_groups": (1, 4)}
    old = {k: v for k, v in a.items() if k != "bn_groups"}
    assert config.differences(old, a) == {} and config.differences(old, b) == {"bn_groups": (1, 4)}


@pytest.mark.parametrize("script, argv", [
    ("cifar", ["--arch", "resnet8_cifar10", "--bn-groups", "4"]),
    ("imagenet", ["--arch", "resnet18", "--bn-groups", "2"]),
])
def test_scripts_build_the_model_with_the_flag(monkeypatch, script, argv):
    import importlib

    mod = importlib.import_module(f"train.{script}")
    got = {}
    monkeypatch.setattr(mod, "build_data", lambda cfg: types.SimpleNamespace(num_classes=10))
    monkeypatch.setattr(mod.loop, "run", lambda cfg, module, *a, **k: got.setdefault("m", module))
    mod.train(mod.parse(argv))
    assert got["m"].bn_groups == int(argv[-1])


SHARDED = textwrap.dedent(
    """
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from train.models.common import batch_norm

    assert jax.device_count() == 2, jax.devices()

    class One(nn.Module):
        groups: int

        @nn.compact
        def __call__(self, x):
            return batch_norm(True, "bn", groups=self.groups)(x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3, 3, 4)) + np.arange(8)[:, None, None,
                    None], jnp.float32)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for groups in (1, 2, 4):
        v = One(groups).init(jax.random.key(0), x)
        f = jax.jit(lambda v, x: One(groups).apply(v, x, mutable=["batch_stats"]))
        y1, u1 = f(v, x)
        y2, u2 = f(jax.device_put(v, NamedSharding(mesh, P())),
                   jax.device_put(x, NamedSharding(mesh, P("data"))))
        np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), u1, u2)
    print("ok")
    """
)


@pytest.mark.slow
def test_sharded_over_two_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
