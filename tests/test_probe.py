"""The linear-probe components (models/probe.py, head ln=False) compute exactly what their docstrings say, and a
frozen encoder gets no gradient at all (stop_gradient: no backward pass)."""

import jax
import jax.numpy as jnp
import numpy as np

from vtfusion_jax import layers, models
from vtfusion_jax.models.vtfusion import VisionTextModel

RNG = np.random.default_rng(0)


def test_pixel_encoder_is_grid_average_pooling():
    image = RNG.normal(size=(2, 16, 16, 3)).astype(np.float32)
    enc = models.get_image_encoder({"name": "pixels", "grid": 4})
    variables = enc.init(jax.random.key(0), image)
    assert not jax.tree.leaves(variables)  # no parameters
    tokens, mask = enc.apply(variables, image)
    want = np.stack(
        [image[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].mean((1, 2)) for i in range(4) for j in range(4)], 1
    )
    assert tokens.shape == (2, 1, 48) and mask.shape == (2, 1) and bool(mask.all())
    np.testing.assert_allclose(tokens[:, 0], want.reshape(2, 48), rtol=1e-5, atol=1e-6)


def test_probe_fusion_and_linear_head_are_logistic_regression():
    b, length, dt, n, di, c = 3, 5, 6, 4, 7, 9
    text = RNG.normal(size=(b, length, dt)).astype(np.float32)
    mask = np.arange(length)[None] < np.array([[5], [2], [1]])
    image = RNG.normal(size=(b, n, di)).astype(np.float32)
    image_mask = np.ones((b, n), bool)
    for pool, feature in (("cls", text[:, 0]), ("mean", (text * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))):
        fusion = models.get_fusion({"name": "probe", "text_pool": pool})
        _, _, pooled = fusion.apply({}, text, mask, image, image_mask)
        np.testing.assert_allclose(pooled, np.concatenate([feature, image.mean(1)], -1), rtol=1e-5, atol=1e-6)
    head = models.get_head({"name": "classification", "hidden_dim": 0, "ln": False}, num_classes=c)
    variables = head.init(jax.random.key(0), None, None, None, None, pooled)
    p = variables["params"]
    assert sorted(p) == ["logits"]  # one Dense, no LayerNorm
    logits = head.apply(variables, None, None, None, None, pooled)
    w, bias = (np.asarray(x) for x in (layers.unbox(p)["logits"]["kernel"], layers.unbox(p)["logits"]["bias"]))
    np.testing.assert_allclose(logits, np.asarray(pooled) @ w + bias, rtol=1e-5, atol=1e-5)


def test_frozen_towers_get_zero_gradients():
    spec = dict(
        width=16,
        image_encoder=dict(name="cnn", channels=(8,), strides=(2,), freeze=True),
        text_encoder=dict(name="bert", vocab_size=50, depth=1, num_heads=2, mlp_dim=16, max_len=8, freeze=False),
        fusion=dict(name="concat"),
        head=dict(name="classification", hidden_dim=0),
    )
    model = VisionTextModel(spec, 4)
    batch = {
        "image": jnp.asarray(RNG.normal(size=(2, 8, 8, 3)), jnp.float32),
        "text_ids": jnp.asarray(RNG.integers(0, 50, (2, 8)), jnp.int32),
        "text_mask": jnp.ones((2, 8), bool),
    }
    # Jitted: op by op, init and grad compile every primitive separately (~5x the CPU time).
    params = layers.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, batch)["logits"].sum()))(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["image_encoder"]))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["text_encoder"]))
