"""train.models: parameter counts against the published architectures, shapes, option-A
shortcut, depthwise convs, module names used by the dense-layer exclusions."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.models import canonical_arch, create_model
from train.models.resnet_cifar import shortcut_a


def _param_count(arch, classes, size):
    spec = create_model(arch, classes)
    v = jax.eval_shape(lambda: spec.module.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, size, size, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"])), v


@pytest.mark.parametrize("arch,classes,size,expected", [
    ("resnet18", 1000, 224, 11_689_512),      # torchvision resnet18
    ("resnet50", 1000, 224, 25_557_032),      # torchvision resnet50
    ("resnet34", 1000, 224, 21_797_672),      # torchvision resnet34
    ("deit_small", 1000, 224, 22_050_664),    # timm deit_small_patch16_224
    ("deit_tiny", 1000, 224, 5_717_416),      # timm deit_tiny_patch16_224
    ("resnet20", 10, 32, 269_722),            # He et al.: 0.27M
    ("resnet32", 10, 32, 464_154),            # He et al.: 0.46M
    ("resnet56", 10, 32, 853_018),            # He et al.: 0.85M
    ("vgg19", 10, 32, 20_040_522 - 5_504),    # PyTorch CIFAR VGG-19-BN less its 16 conv biases
])
def test_parameter_counts_match_published(arch, classes, size, expected):
    n, _ = _param_count(arch, classes, size)
    assert n == expected


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


@pytest.mark.parametrize("arch,size", [("resnet20", 8), ("vgg19", 8), ("mobilenetv2", 8),
                                       ("resnet18", 16), ("resnet50", 16), ("deit_tiny", 16)])
def test_forward_shapes_and_dense_layer_names(arch, size):
    spec = create_model(arch, 5, width_mult=0.25 if "deit" not in arch else 0.125, depth=1)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    v = jax.eval_shape(lambda x: spec.module.init(jax.random.PRNGKey(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: spec.module.apply(v, x, train=False), v, x)
    assert out.shape == (2, 5)
    kernels = {p[: -len("/kernel")]: a for p, a in _paths(v["params"]).items()
               if p.endswith("/kernel")}
    dense = [p for p in kernels if any(re.search(r, p) for r in spec.dense_layers)]
    # Exactly the paper's exclusions exist under these names.
    if spec.family == "resnet":
        assert sorted(dense) == ["fc", "stem"]
    elif spec.family == "deit":
        assert sorted(dense) == ["head", "patch_embed"]
    elif spec.family == "mobilenetv2":
        assert {"stem", "classifier"} <= set(dense)
        assert all(p.endswith("/dw") for p in dense if p not in ("stem", "classifier"))
    else:
        assert sorted(dense) == ["classifier", "stem"]
    # Every sparse kernel's input-channel axis (-2) is divisible by M=4.
    for p, k in kernels.items():
        if p not in dense:
            assert k.shape[-2] % 4 == 0, (p, k.shape)


def test_mobilenetv2_depthwise_is_grouped():
    spec = create_model("mobilenetv2", 10)
    v = jax.eval_shape(lambda: spec.module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    dw = v["params"]["block1"]["dw"]["kernel"]
    assert dw.shape == (3, 3, 1, 96)  # (kh, kw, Cin/groups, C): real depthwise
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))
    assert n == 2_236_682


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


def test_reference_arch_names_and_errors():
    assert canonical_arch("resnet32_cifar10") == "resnet32"
    assert canonical_arch("vgg19_cifar10") == "vgg19"
    assert canonical_arch("vit_deit_small_patch16_224") == "deit_small"
    with pytest.raises(ValueError, match="unknown --arch"):
        canonical_arch("resnet33")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", 0)
