"""VisionTextModel: components chosen by config name, composed end to end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vtfusion_jax import layers
from vtfusion_jax.models.vtfusion import VisionTextModel

CFG = dict(
    width=32,
    dtype="float32",
    attention_impl="xla",
    scan_layers=False,
    remat_policy="none",
    image_encoder=dict(name="cnn", channels=(8, 16, 16)),
    text_encoder=dict(name="bert", vocab_size=64, depth=1, num_heads=4, mlp_dim=64, post_ln=False),
    fusion=dict(name="co_attention", num_layers=1, num_heads=4, mlp_dim=64),
    head=dict(name="classification", hidden_dim=32),
)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, size=n)
    image = rng.normal(size=(n, 64, 64, 3)).astype(np.float32) * 0.1
    image[label == 1, :32] += 1.0  # the answer is in the image: top half bright or not
    return dict(
        image=jnp.asarray(image),
        text_ids=jnp.asarray(rng.integers(1, 64, size=(n, 5)), jnp.int32),
        text_mask=jnp.ones((n, 5), bool),
        label=jnp.asarray(label, jnp.int32),
    )


def test_model_learns_an_image_dependent_label():
    """A few AdamW steps on a label that only the image reveals: the fused model must fit it."""
    model = VisionTextModel(CFG, num_classes=2)
    batch = _batch(16)
    params = layers.unbox(jax.jit(model.init)(jax.random.key(0), batch))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss_fn(p):
            logits = model.apply(p, batch)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss

    first = None
    for _ in range(30):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    logits = jax.jit(model.apply)(params, batch)["logits"]
    assert logits.shape == (16, 2) and logits.dtype == jnp.float32
    assert float(loss) < 0.2 * first
    assert np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"])) == 1.0


def test_bfloat16_model_keeps_float32_params_and_logits():
    model = VisionTextModel(dict(CFG, dtype="bfloat16"), num_classes=3)
    params = jax.eval_shape(model.init, jax.random.key(0), _batch(2))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(layers.unbox(params)))
    assert jax.eval_shape(model.apply, params, _batch(2))["logits"].dtype == jnp.float32


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("fusion", dict(name="coattention"), "unknown fusion 'coattention'; valid:"),
        ("image_encoder", dict(name="cnn", chanels=(8,)), "has no field 'chanels'"),
        ("head", dict(name="itm"), "unknown head 'itm'; valid: \\['classification'\\]"),
        ("dtype", "fp8", "unknown dtype 'fp8'"),
    ],
)
def test_bad_config_names_raise_listing_valid_ones(key, value, message):
    model = VisionTextModel(dict(CFG, **{key: value}), num_classes=2)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), _batch(2))


@pytest.mark.parametrize("image_encoder", ["cnn", "resnet18", "vit"])
@pytest.mark.parametrize("text_encoder", ["bert", "gru"])
def test_every_parameter_has_logical_axis_names(image_encoder, text_encoder):
    """The training code shards parameters from these names alone, so none may be missing or mis-sized."""
    allowed = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab", "conv_in", "conv_out", "layers", None}
    for fusion in ("co_attention", "bottleneck", "query", "merged", "gated_cross"):
        cfg = dict(
            CFG,
            scan_layers=True,
            image_encoder=dict(name=image_encoder),
            text_encoder=dict(name=text_encoder),
            fusion=dict(name=fusion, num_layers=1, num_heads=4, mlp_dim=64),
        )
        variables = jax.eval_shape(VisionTextModel(cfg, 3).init, jax.random.key(0), _batch(2))
        leaves = jax.tree_util.tree_leaves_with_path(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for path, leaf in leaves:
            where = f"{fusion}: {jax.tree_util.keystr(path)}"
            assert isinstance(leaf, nn.Partitioned), f"{where} has no logical axis names"
            assert len(leaf.names) == leaf.value.ndim, where
            assert set(leaf.names) <= allowed, where


def test_every_fusion_accepts_multiscale_image_tokens():
    from vtfusion_jax.models.fusion import FUSIONS

    for fusion in FUSIONS:
        cfg = dict(
            CFG,
            image_encoder=dict(name="cnn", channels=(8, 16, 16), scales=(0, 1, 2)),
            fusion=dict(name=fusion, num_layers=1, num_heads=4, mlp_dim=64),
        )
        model = VisionTextModel(cfg, num_classes=3)
        variables = jax.eval_shape(model.init, jax.random.key(0), _batch(2))
        assert jax.eval_shape(model.apply, variables, _batch(2))["logits"].shape == (2, 3), fusion
