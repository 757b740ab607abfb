"""Whole-model analytic FLOPs (vtfusion_jax/flops.py): exact against the traced program's matmuls for every
encoder and fusion variant, and within 10 % of XLA's cost_analysis (which also counts element-wise work)."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest

from vtfusion_jax import flops
from vtfusion_jax.models import FUSIONS, get_fusion
from vtfusion_jax.models.vtfusion import VisionTextModel

B, S, L, C = 2, 32, 8, 7

IMAGE_ENCODERS = [
    dict(name="vit", depth=2, num_heads=2, mlp_dim=64, patch_size=4),
    dict(name="cnn", channels=(8, 16), strides=(2, 2), scales=(0, 1)),  # multi-scale tokens
    dict(name="resnet18", stem="small", base_filters=8),
    dict(name="resnet50", stem="imagenet", base_filters=4, project=False),  # 128-d tokens: the fusion projects
    dict(name="vit", depth=1, num_heads=2, mlp_dim=64, patch_size=4, use_cls=True),
]
TEXT_ENCODERS = [
    dict(name="bert", vocab_size=50, depth=2, num_heads=2, mlp_dim=64, max_len=16),
    dict(name="gru", vocab_size=50, hidden=24),
    dict(name="gru", vocab_size=50, hidden=24, bidirectional=False),
]


def _fusion_spec(name, **fields):
    """``{"name": name}`` plus those of ``fields`` the variant has (the probe has no sizes)."""
    have = {f.name for f in dataclasses.fields(FUSIONS[name].cls)}
    return dict(name=name, **{k: v for k, v in fields.items() if k in have})


def _batch(b=B, s=S, length=L):
    return {
        "image": jnp.zeros((b, s, s, 3)),
        "text_ids": jnp.zeros((b, length), jnp.int32),
        "text_mask": jnp.ones((b, length), bool),
    }


def _abstract(model, batch):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), batch))


def test_registered_pooled_width_matches_the_variants():
    for name in FUSIONS:
        fusion = get_fusion(_fusion_spec(name, width=16, num_layers=1, num_heads=2, mlp_dim=24))
        assert flops.pooled_width(fusion, 3, 5, 16, 16) == flops.traced_pooled_width(fusion, 3, 5, 16, 16), name
    for extra in (dict(image_pool="max"), dict(image_pool="mean", pool_product=True)):  # cross's pooled options
        fusion = get_fusion(dict(name="cross", width=16, num_layers=1, num_heads=2, mlp_dim=24, **extra))
        assert flops.pooled_width(fusion, 3, 5, 16, 16) == flops.traced_pooled_width(fusion, 3, 5, 16, 16), extra


@pytest.mark.parametrize("i,fusion", list(enumerate(sorted(FUSIONS))))
def test_analytic_equals_traced_matmul_flops(i, fusion):
    """Every fusion variant, rotating through every encoder (ViT +-CLS, multi-scale CNN, ResNet-18/50, BERT,
    bi/uni-directional GRU), unrolled and scanned: the formula equals the matmuls of the traced forward exactly."""
    for scan in (False, True) if i < 2 else (False,):  # scanned stacks: the first two cases
        cfg = dict(
            width=32,
            scan_layers=scan,
            image_encoder=IMAGE_ENCODERS[i % len(IMAGE_ENCODERS)],
            text_encoder=TEXT_ENCODERS[i % len(TEXT_ENCODERS)],
            fusion=_fusion_spec(fusion, num_layers=2, num_heads=2, mlp_dim=48),
            head=dict(name="classification", hidden_dim=16),
        )
        model, batch = VisionTextModel(cfg, C), _batch()
        jaxpr = jax.make_jaxpr(lambda p, model=model, batch=batch: model.apply(p, batch))(_abstract(model, batch))
        analytic = flops.model_flops(cfg, (S, S), L, C)
        assert flops.jaxpr_flops(jaxpr) == B * analytic["forward"], (fusion, scan, analytic)
        assert analytic["train"] == 3 * analytic["forward"]
        parts = ("image_encoder", "text_encoder", "fusion", "head")
        assert sum(analytic[k] for k in parts) == analytic["forward"]


def test_jaxpr_flops_counts_dots_convs_and_scan_lengths():
    x, w = jnp.zeros((4, 8)), jnp.zeros((8, 16))
    assert flops.jaxpr_flops(jax.make_jaxpr(lambda a, b: a @ b)(x, w)) == 2 * 4 * 8 * 16

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ b[:, :8]), None), a, None, length=5)[0]

    assert flops.jaxpr_flops(jax.make_jaxpr(scanned)(x, w)) == 5 * 2 * 4 * 8 * 8
    img, k = jnp.zeros((1, 10, 10, 3)), jnp.zeros((3, 3, 3, 4))
    conv = jax.make_jaxpr(
        lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )(img, k)
    assert flops.jaxpr_flops(conv) == 2 * 10 * 10 * 4 * 3 * 3 * 3


def test_shared_benchmark_size_matches_the_issue_calibration():
    """configs/perf.py's shared size: ~23M parameters and ~120 GFLOP per batch-32 training step (issue 8)."""
    from configs import perf

    cfg = perf.plain_config()
    b = cfg["bench"]
    fl = flops.model_flops(cfg["model"], (b["image_size"],) * 2, b["text_len"], b["num_classes"])
    model = VisionTextModel(cfg["model"], b["num_classes"])
    batch = _batch(1, b["image_size"], b["text_len"])
    n = flops.param_count(_abstract(model, batch)["params"])
    assert 22e6 < n < 24e6, n
    assert fl["image_tokens"] == 64
    assert 110e9 < fl["train"] * b["batch_size"] < 125e9, fl


@pytest.mark.parametrize(
    "fusion,image_encoder",
    [
        ("co_attention", dict(name="vit", depth=2, num_heads=4, mlp_dim=512, patch_size=4)),
        ("merged", dict(name="cnn", channels=(32, 64, 128), strides=(2, 2, 1))),
    ],
)
def test_analytic_within_10_percent_of_xla_cost_analysis(fusion, image_encoder):
    """Whole model at a small size where matmuls dominate: forward and training (grad) FLOPs of XLA's
    cost_analysis within 10 % of the formula (3x forward for training)."""
    cfg = dict(
        width=128,
        image_encoder=image_encoder,
        text_encoder=dict(name="bert", vocab_size=100, depth=2, num_heads=4, mlp_dim=512, max_len=16),
        fusion=dict(name=fusion, num_layers=2, num_heads=4, mlp_dim=512),
        head=dict(name="classification", hidden_dim=128),
    )
    model, batch = VisionTextModel(cfg, C), _batch(length=16)
    params = _abstract(model, batch)
    analytic = flops.model_flops(cfg, (S, S), 16, C)

    def loss(p):
        logits = model.apply(p, batch)["logits"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(B, jnp.int32)))

    fwd = jax.jit(lambda p: model.apply(p, batch)).lower(params).cost_analysis()["flops"] / B
    train = jax.jit(jax.grad(loss)).lower(params).cost_analysis()["flops"] / B
    assert abs(fwd / analytic["forward"] - 1) < 0.10, (fwd, analytic["forward"])
    assert abs(train / analytic["train"] - 1) < 0.10, (train, analytic["train"])
