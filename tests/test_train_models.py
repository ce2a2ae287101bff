"""train.models: parameter counts against the published architectures and the Bi-Mask reference's
networks, shapes, option-A shortcut, depthwise convs, the reference's structure (full 3x3 convs,
ReLU, the unused classifier bias), its PyTorch-default initialisation, and the sparse layer sets
through bimask_jax.sparse's selection."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax
from train.models import canonical_arch, create_model, is_reference_arch
from train.models.common import (
    conv_init,
    cut_normal_init,
    timm_trunc_normal,
    torch_bias_init,
    torch_kernel_init,
    uniform_init,
)
from train.models.ref_vgg import ClassifierConv
from train.models.resnet_cifar import shortcut_a


def _init_shapes(spec, size):
    return jax.eval_shape(lambda: spec.module.init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, size, size, 3)), train=False))


def _param_count(arch, classes, size):
    v = _init_shapes(create_model(arch, classes), size)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"])), v


@pytest.mark.parametrize("arch,classes,size,expected", [
    # standard architectures
    ("tv_resnet18", 1000, 224, 11_689_512),   # torchvision resnet18
    ("tv_resnet50", 1000, 224, 25_557_032),   # torchvision resnet50
    ("tv_resnet34", 1000, 224, 21_797_672),   # torchvision resnet34
    ("deit_small", 1000, 224, 22_050_664),    # timm deit_small_patch16_224
    ("deit_tiny", 1000, 224, 5_717_416),      # timm deit_tiny_patch16_224
    ("resnet20", 10, 32, 269_722),            # He et al.: 0.27M
    ("resnet32", 10, 32, 464_154),            # He et al.: 0.46M
    ("resnet56", 10, 32, 853_018),            # He et al.: 0.85M
    ("vgg19", 10, 32, 20_040_522 - 5_504),    # PyTorch CIFAR VGG-19-BN less its 16 conv biases
    ("mobilenet_v2", 10, 32, 2_236_682),      # CIFAR MobileNetV2 (depthwise)
    # the Bi-Mask reference's networks (counts of the PyTorch modules, issue 12)
    ("resnet32_cifar10", 10, 32, 1_849_898),
    ("vgg19_cifar10", 10, 32, 20_035_018),    # conv weights, BN, 1x1-conv classifier + its bias
    ("mobilenetv2", 10, 32, 42_843_002),
    ("resnet18", 1000, 224, 11_689_512),      # the torchvision architecture
    ("resnet50", 1000, 224, 25_557_032),
    ("vit_deit_small_patch16_224", 1000, 224, 22_050_664),
    ("vit_deit_base_patch16_224", 1000, 224, 86_567_656),  # timm deit_base_patch16_224
])
def test_parameter_counts_match_published(arch, classes, size, expected):
    n, _ = _param_count(arch, classes, size)
    assert n == expected


def _ref_resnet_cifar_count(depth, classes, widths=(32, 64, 128)):
    """The reference's CIFAR ResNet counted from its layer list (3x3 convs without bias, BN
    weight+bias, option-A shortcuts without parameters, Linear with bias)."""
    n = (depth - 2) // 6
    total, cin = 27 * widths[0] + 2 * widths[0], widths[0]
    for w in widths:
        for _ in range(n):
            total += 9 * cin * w + 9 * w * w + 4 * w
            cin = w
    return total + cin * classes + classes


@pytest.mark.parametrize("depth,classes", [(32, 10), (32, 100), (20, 10), (56, 100)])
def test_reference_cifar_resnet_count_formula(depth, classes):
    n, _ = _param_count(f"resnet{depth}_cifar{classes}", classes, 32)
    assert n == _ref_resnet_cifar_count(depth, classes)
    assert _ref_resnet_cifar_count(32, 10) == 1_849_898


def test_shortcut_a_pads_channels_and_subsamples():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = shortcut_a(x, 7, 2)
    assert y.shape == (2, 2, 2, 7)
    np.testing.assert_array_equal(y[..., 2:5], np.asarray(x)[:, ::2, ::2, :])
    assert float(jnp.abs(y[..., :2]).sum()) == 0 and float(jnp.abs(y[..., 5:]).sum()) == 0


def _paths(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_paths(v, p))
        else:
            out[p] = v
    return out


def _kernels(params):
    return {p[: -len("/kernel")]: a for p, a in _paths(params).items() if p.endswith("/kernel")}


@pytest.mark.parametrize("arch,size,dense_expected", [
    ("resnet20", 8, ["classifier", "stem"]),
    ("vgg19", 8, ["classifier", "stem"]),
    ("mobilenet_v2", 8, None),
    ("tv_resnet18", 16, ["fc", "stem"]),
    ("tv_resnet50", 16, ["fc", "stem"]),
    ("deit_tiny", 16, ["head", "patch_embed"]),
    ("resnet32_cifar10", 8, ["fc"]),
    ("vgg19_cifar10", 8, []),
    ("mobilenetv2", 8, ["linear"]),
    ("resnet18", 16, ["conv1", "fc"]),
    ("resnet50", 16, ["conv1", "fc"]),
    ("vit_deit_tiny_patch16_224", 16, ["head", "patch_embed"]),
])
def test_forward_shapes_and_dense_layer_names(arch, size, dense_expected):
    spec = create_model(arch, 10, width_mult=0.25 if "deit" not in arch else 0.125, depth=1)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    v = jax.eval_shape(lambda x: spec.module.init(jax.random.PRNGKey(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: spec.module.apply(v, x, train=False), v, x)
    assert out.shape == (2, 10)
    kernels = _kernels(v["params"])
    dense = [p for p in kernels if any(re.search(r, p) for r in spec.dense_layers)]
    ihw = [p for p in kernels if any(re.search(r, p) for r in spec.ihw_layers)]
    if dense_expected is None:  # standard MobileNetV2: stem, classifier and every depthwise conv
        assert {"stem", "classifier"} <= set(dense)
        assert all(p.endswith("/dw") for p in dense if p not in ("stem", "classifier"))
    else:
        assert sorted(dense) == dense_expected
    # The ihw layers are exactly the reference's sparse 3-channel stems.
    assert ihw == ({"resnet32_cifar10": ["conv1"], "vgg19_cifar10": ["features_0"],
                    "mobilenetv2": ["conv1"]}.get(arch, []))
    # Every other sparse kernel's input-channel axis (-2) is divisible by M=4.
    for p, k in kernels.items():
        if p not in dense and p not in ihw:
            assert k.shape[-2] % 4 == 0, (p, k.shape)


# The reference's sparse layers (NMConv/NMConv-linear modules): CIFAR ResNet-32: stem + 30 block
# convs; VGG-19: 16 convs + the 1x1-conv classifier; MobileNetV2: stem + 17 x 3 block convs + 4
# shortcut convs + the 320->1280 conv; ResNet-18: 16 + 3 downsample; ResNet-50: 48 + 4
# downsample (stem and fc are nn.Conv2d/nn.Linear); DeiT: qkv, proj, fc1, fc2 of 12 blocks.
REFERENCE_SPARSE = {"resnet32_cifar10": 31, "vgg19_cifar10": 17, "mobilenetv2": 57,
                    "resnet18": 19, "resnet50": 52, "vit_deit_small_patch16_224": 48}


def _selection(spec, size, **kw):
    """``({path: {"sparse", "reason"}}, abstract variables)`` of the wrapper's selection."""
    model = bimask_jax.sparse(spec.module, n=2, m=4, method="bimask", exclude=spec.dense_layers, **kw)
    x = jnp.zeros((1, size, size, 3))
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    layers = bimask_jax.layers(model, sample_args=(x,), sample_kwargs={"train": False})
    return {x.path: {"sparse": x.sparse, "reason": x.note} for x in layers}, v


@pytest.mark.parametrize("arch", sorted(REFERENCE_SPARSE))
def test_reference_sparse_layer_set_with_hwi_grouping(arch):
    """Today's grouping ("hwi", along Cin) reproduces the reference's set except the 3-channel
    stems, which it leaves dense; ``ihw_layers`` names exactly those."""
    deit = "deit" in arch  # full widths otherwise (a width multiplier can drop shortcut convs)
    spec = create_model(arch, 10, width_mult=0.125 if deit else 1.0, patch_size=8 if deit else None)
    size = 16 if deit else 32
    layers, v = _selection(spec, size)
    sparse = [p for p, d in layers.items() if d["sparse"]]
    ihw = [p for p in layers if any(re.search(r, p) for r in spec.ihw_layers)]
    assert len(sparse) + len(ihw) == REFERENCE_SPARSE[arch]
    for p in ihw:
        assert not layers[p]["sparse"] and "input channels 3 not divisible" in layers[p]["reason"]
    skipped = {p for p, d in layers.items() if not d["sparse"]}
    assert skipped == set(ihw) | {p for p in layers if any(re.search(r, p) for r in spec.dense_layers)}
    # every sparse layer carries Bi-Mask state
    assert len(jax.tree.leaves(v["bimask"])) == 2 * len(sparse)


@pytest.mark.parametrize("arch", ["resnet32_cifar10", "vgg19_cifar10", "mobilenetv2", "resnet50"])
def test_reference_sparse_layer_set_with_ihw_grouping(arch):
    spec = create_model(arch, 10)
    layers, _ = _selection(spec, 32, k_order="ihw")
    sparse = [p for p, d in layers.items() if d["sparse"]]
    assert len(sparse) == REFERENCE_SPARSE[arch]
    assert all(any(re.search(r, p) for p in sparse) for r in spec.ihw_layers)


def test_reference_mobilenetv2_structure():
    _, v = _param_count("mobilenetv2", 10, 32)
    p = v["params"]
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert p["layers_0"]["conv1"]["kernel"].shape == (1, 1, 32, 32)  # expand conv also at t=1
    assert p["layers_1"]["conv2"]["kernel"].shape == (3, 3, 96, 96)  # full conv, not depthwise
    assert p["conv2"]["kernel"].shape == (1, 1, 320, 1280)
    assert p["linear"]["kernel"].shape == (1280, 10) and p["linear"]["bias"].shape == (10,)
    # 1x1-conv shortcuts exactly where stride is 1 and the width changes
    assert sorted(int(k.split("_")[1]) for k in p if "shortcut_0" in p[k]) == [0, 1, 10, 16]
    assert sum(1 for k in p if k.startswith("layers_")) == 17
    convs = [k for k in _kernels(p) if k != "linear"]
    assert all("bias" not in _paths(p).get(k[: -len("kernel")], {}) for k in convs)


def test_reference_cifar_resnet_and_imagenet_resnet_structure():
    _, v = _param_count("resnet32_cifar10", 10, 32)
    p = v["params"]
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert p["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 32, 64)
    assert p["layer3_4"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert "layer3_5" not in p and p["fc"]["kernel"].shape == (128, 10)
    _, v = _param_count("resnet50", 1000, 64)
    p = v["params"]
    assert p["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)  # stride on the 3x3
    assert sorted(k for k in p if "downsample_0" in p[k]) == ["layer1_0", "layer2_0", "layer3_0",
                                                             "layer4_0"]


def _batchnorms_without_bn_in_path(arch, size):
    _, v = _param_count(arch, 10 if "cifar10" in arch or arch == "mobilenetv2" else 1000, size)
    return sorted(p[: -len("/scale")] for p in _paths(v["params"])
                  if p.endswith("/scale") and "bn" not in p)


def test_reference_batchnorm_names_match_the_reference_state_dict():
    """The reference decays every parameter whose name lacks "bn": its VGG BatchNorms
    (``features.1``...), MobileNetV2's shortcut BatchNorms and ResNet-50's downsample BatchNorms.
    Our module names are the reference's, so the same rule on our paths selects the same ones."""
    assert _batchnorms_without_bn_in_path("resnet32_cifar10", 32) == []
    vgg = _batchnorms_without_bn_in_path("vgg19_cifar10", 32)
    assert len(vgg) == 16 and vgg[0] == "features_1"
    assert _batchnorms_without_bn_in_path("mobilenetv2", 32) == [
        f"layers_{i}/shortcut_1" for i in (0, 1, 10, 16)]
    assert _batchnorms_without_bn_in_path("resnet50", 64) == [
        f"layer{s}_0/downsample_1" for s in (1, 2, 3, 4)]


def _layer_inits(arch, classes, size, **kw):
    """The initialisers of every Conv/Dense/BatchNorm/LayerNorm as the module calls them
    (recorded during an abstract init: no values computed), keyed by layer path."""
    spec = create_model(arch, classes, **kw)
    seen = {}

    def record(next_fun, args, kwargs, ctx):
        m = ctx.module
        if ctx.method_name == "__call__" and isinstance(
                m, (nn.Conv, nn.Dense, nn.BatchNorm, nn.LayerNorm)):
            seen["/".join(m.path)] = m
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        v = _init_shapes(spec, size)
    return seen, v["params"]


def _is_torch_bias(init, fan_in):
    return (isinstance(init, functools.partial) and init.func is uniform_init
            and init.keywords["bound"] == pytest.approx(1.0 / math.sqrt(fan_in)))


@pytest.mark.parametrize("arch,classes,size", [
    ("resnet32_cifar10", 10, 32), ("vgg19_cifar10", 10, 32), ("mobilenetv2", 10, 32),
    ("resnet50", 1000, 64)])
def test_reference_cnn_init_is_pytorch_default(arch, classes, size):
    """Conv and Linear weights: kaiming_uniform(a=sqrt(5)); Linear biases U(+-1/sqrt(fan_in));
    no conv bias (``bias=False``) except the VGG classifier's unused one; BatchNorm 1 and 0."""
    layers, params = _layer_inits(arch, classes, size)
    convs = [m for m in layers.values() if isinstance(m, nn.Conv)]
    assert len(convs) >= 17
    for path, m in layers.items():
        if isinstance(m, nn.BatchNorm):
            assert m.scale_init is nn.initializers.ones and m.bias_init is nn.initializers.zeros
            continue
        assert m.kernel_init is torch_kernel_init, path
        if isinstance(m, nn.Dense):
            assert m.use_bias and _is_torch_bias(m.bias_init, params[path]["kernel"].shape[0])
        else:
            assert not m.use_bias, path
    # the standard networks keep their kaiming-normal fan-out init
    std_layers, _ = _layer_inits({"resnet32_cifar10": "resnet32", "vgg19_cifar10": "vgg19",
                                  "mobilenetv2": "mobilenet_v2", "resnet50": "tv_resnet50"}[arch],
                                 classes, size)
    assert all(m.kernel_init is conv_init for m in std_layers.values() if isinstance(m, nn.Conv))


def test_reference_deit_init():
    """Sparse linears (qkv, proj, fc1, fc2): N(0, 0.02^2) cut at +-2, zero bias; patch_embed and
    head (not reached by the reference's ``_init_weights``): PyTorch defaults."""
    layers, params = _layer_inits("vit_deit_tiny_patch16_224", 10, 16, depth=2, patch_size=8)
    for path, m in layers.items():
        name = path.split("/")[-1]
        if isinstance(m, nn.LayerNorm):
            assert m.scale_init is nn.initializers.ones and m.bias_init is nn.initializers.zeros
        elif name in ("qkv", "proj", "fc1", "fc2"):
            k = m.kernel_init
            assert k.func is cut_normal_init and k.keywords == {"std": 0.02, "cut": 2.0}
            assert m.bias_init is nn.initializers.zeros
        elif name == "patch_embed":
            assert m.kernel_init is torch_kernel_init and _is_torch_bias(m.bias_init, 3 * 8 * 8)
        else:
            assert name == "head", path
            assert m.kernel_init is torch_kernel_init and _is_torch_bias(m.bias_init, 192)
    assert len(layers) == 2 * (2 + 4) + 3  # per block 2 LayerNorms, 4 Dense; embed, norm, head
    std_layers, _ = _layer_inits("deit_tiny", 10, 16, depth=2, patch_size=8)
    assert std_layers["head"].bias_init is nn.initializers.zeros


def test_pytorch_default_initializers_draw_the_pytorch_distribution():
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a conv kernel (kh, kw, Cin, Cout) with fan_in =
    kh*kw*Cin and a Dense kernel with fan_in = in; cut normal: std 0.02, beyond 2 std."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    for key, shape, fan_in in ((k1, (3, 3, 64, 96), 576), (k2, (512, 96), 512)):
        w = np.asarray(torch_kernel_init(key, shape)).ravel()
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.999 * bound
        assert abs(w.std() * math.sqrt(3) / bound - 1) < 0.015 and abs(w.mean()) < 0.015 * bound
    b = np.asarray(torch_bias_init(27)(k3, (96,)))
    assert np.abs(b).max() <= 1 / math.sqrt(27) and np.abs(b).max() > 0.9 / math.sqrt(27)
    w = np.asarray(timm_trunc_normal(0.02)(k2, (3, 3, 64, 96))).ravel()
    assert abs(w.std() / 0.02 - 1) < 0.01 and np.abs(w).max() > 3.5 * 0.02
    with pytest.raises(ValueError, match="fan_in"):
        torch_bias_init(0)


def test_reference_vgg_classifier_bias_is_never_added():
    conv = ClassifierConv(10, (1, 1), kernel_init=torch_kernel_init)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 1, 1, 16))
    v = conv.init(jax.random.PRNGKey(0), x)
    bias = np.asarray(v["params"]["bias"])
    assert bias.shape == (10,) and 0 < np.abs(bias).min() and np.abs(bias).max() <= 0.25
    y = np.asarray(conv.apply(v, x))
    np.testing.assert_allclose(y, np.asarray(x) @ np.asarray(v["params"]["kernel"][0, 0]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="use_bias must be False"):
        ClassifierConv(10, (1, 1), use_bias=True).init(jax.random.PRNGKey(0), x)


def _primitives(arch):
    """Every primitive of the model's eval forward, sub-jaxprs (custom_jvp, pjit) included."""
    spec = create_model(arch, 10, width_mult=0.25)
    v = _init_shapes(spec, 8)
    closed = jax.make_jaxpr(lambda v, x: spec.module.apply(v, x, train=False))(
        v, jnp.zeros((2, 8, 8, 3)))
    out = set()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            out.add(str(e.primitive))
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(closed.jaxpr)
    return out


def test_reference_activations_are_relu_not_relu6():
    prims = _primitives("mobilenetv2")
    assert "max" in prims and "min" not in prims  # ReLU only; ReLU6 is min(max(x, 0), 6)
    assert "min" in _primitives("mobilenet_v2")


@pytest.mark.slow
def test_deit_drop_path_uses_dropout_rng_only_in_training():
    spec = create_model("deit_tiny", 3, width_mult=0.125, depth=2, drop_path=0.5)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    v = jax.jit(lambda x: spec.module.init(jax.random.PRNGKey(0), x, train=False))(x)
    fwd = jax.jit(lambda v, x, k, train: spec.module.apply(v, x, train=train, rngs={"dropout": k}),
                  static_argnums=3)
    a = fwd(v, x, jax.random.PRNGKey(1), True)
    b = fwd(v, x, jax.random.PRNGKey(2), True)
    e1, e2 = fwd(v, x, jax.random.PRNGKey(1), False), fwd(v, x, jax.random.PRNGKey(2), False)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(e1, e2)


def test_mobilenet_v2_depthwise_is_grouped():
    n, v = _param_count("mobilenet_v2", 10, 32)
    assert v["params"]["block1"]["dw"]["kernel"].shape == (3, 3, 1, 96)  # real depthwise
    assert n == 2_236_682


REFERENCE_NAMES = ["resnet32_cifar10", "resnet32_cifar100", "vgg19_cifar10", "vgg19_cifar100",
                   "mobilenetv2", "resnet18", "resnet50", "vit_deit_tiny_patch16_224",
                   "vit_deit_small_patch16_224", "vit_deit_base_patch16_224",
                   "deit_small_patch16_224", "resnet20_cifar10", "resnet56_cifar100"]
STANDARD_NAMES = ["resnet20", "resnet32", "resnet56", "vgg19", "vgg19_bn", "mobilenet_v2",
                  "tv_resnet18", "tv_resnet50", "deit_tiny", "deit_small", "deit_base"]


def test_reference_and_standard_names_and_errors():
    assert all(is_reference_arch(a) for a in REFERENCE_NAMES)
    assert not any(is_reference_arch(a) for a in STANDARD_NAMES)
    assert create_model("resnet32_cifar10", 10).module.depth == 32
    assert canonical_arch("deit_small_patch16_224") == "vit_deit_small_patch16_224"
    assert canonical_arch("vgg19_bn") == "vgg19"
    with pytest.raises(ValueError, match="unknown --arch"):
        canonical_arch("resnet33")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", 0)
    with pytest.raises(ValueError, match="100-class network"):
        create_model("resnet32_cifar100", 10)
    with pytest.raises(ValueError, match="1x1 feature map"):
        _init_shapes(create_model("vgg19_cifar10", 10), 64)
