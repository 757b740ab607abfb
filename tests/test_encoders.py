"""Image and text encoders: token shapes, masks, and padding that never leaks into real positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtfusion_jax.layers import unbox
from vtfusion_jax.models import get_image_encoder, get_text_encoder
from vtfusion_jax.models.vision import token_grids

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "spec,image_hw,n_tokens",
    [
        (dict(name="cnn", width=32, channels=(8, 16, 16)), 64, 8 * 8),  # easy-VQA: 64 px -> 8x8 grid
        (dict(name="cnn", width=32, channels=(8, 16, 16)), 75, 10 * 10),  # Sort-of-CLEVR: 75 px -> 10x10
        (dict(name="vit", width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=8, use_cls=True), 64, 1 + 8 * 8),
        (dict(name="vit", width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=16, pos_emb="sincos2d"), 64, 16),
    ],
)
def test_image_encoder_tokens(spec, image_hw, n_tokens):
    enc = get_image_encoder(spec)
    image = jnp.asarray(RNG.normal(size=(2, image_hw, image_hw, 3)), jnp.float32)
    params = jax.jit(enc.init)(jax.random.key(0), image)
    tokens, mask = jax.jit(enc.apply)(params, image)
    assert tokens.shape == (2, n_tokens, 32) and mask.shape == (2, n_tokens)
    assert mask.dtype == jnp.bool_ and bool(mask.all())
    # Tokens depend on the image, and on where things are: shifting the image changes the tokens.
    shifted = jnp.roll(image, 8, axis=2)
    assert not np.allclose(np.asarray(jax.jit(enc.apply)(params, shifted)[0]), np.asarray(tokens), atol=1e-4)


@pytest.mark.parametrize(
    "name,stem,hw,n_blocks,grid",
    [
        ("resnet18", "small", 64, 2 + 2 + 2 + 2, 4),  # /2 stem, then /8 over the stages
        ("resnet50", "small", 64, 3 + 4 + 6 + 3, 4),
        ("resnet50", "imagenet", 224, 3 + 4 + 6 + 3, 7),  # /4 stem, /32 in all: 7x7 tokens
    ],
)
def test_resnet_layouts(name, stem, hw, n_blocks, grid):
    """Shapes only (abstract evaluation: compiling a ResNet is slow on this CPU)."""
    enc = get_image_encoder(dict(name=name, width=16, base_filters=4, stem=stem))
    image = jnp.zeros((1, hw, hw, 3))
    variables = jax.eval_shape(enc.init, jax.random.key(0), image)
    blocks = [k for k in variables["params"] if k.startswith("stage")]
    assert len(blocks) == n_blocks
    assert ("conv3" in variables["params"]["stage3_block1"]) == (name == "resnet50")  # bottleneck: 1x1,3x3,1x1
    tokens, mask = jax.eval_shape(enc.apply, variables, image)
    assert tokens.shape == (1, grid * grid, 16) and mask.shape == (1, grid * grid)


@pytest.mark.parametrize(
    "spec",
    [
        dict(name="bert", vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64),
        dict(name="bert", vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64, post_ln=False),
        dict(name="gru", vocab_size=50, width=32, hidden=16),
        dict(name="gru", vocab_size=50, width=32, hidden=16, bidirectional=False),
    ],
)
def test_text_encoder_respects_padding(spec):
    enc = get_text_encoder(spec)
    ids = jnp.asarray(RNG.integers(1, 50, size=(2, 6)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
    params = jax.jit(enc.init)(jax.random.key(0), ids, mask)
    apply = jax.jit(enc.apply)
    tokens, out_mask = apply(params, ids, mask)
    assert tokens.shape == (2, 6, 32)
    np.testing.assert_array_equal(np.asarray(out_mask), np.asarray(mask))
    assert np.all(np.asarray(tokens[1, 3:]) == 0.0)  # padded outputs are zero
    # Other ids in the padded positions, and a longer padded sequence: real positions unchanged.
    junk = ids.at[1, 3:].set(7)
    np.testing.assert_allclose(np.asarray(apply(params, junk, mask)[0][1, :3]), np.asarray(tokens[1, :3]), atol=1e-5)
    longer_ids = jnp.concatenate([ids, jnp.full((2, 4), 9, jnp.int32)], 1)
    longer_mask = jnp.concatenate([mask, jnp.zeros((2, 4), bool)], 1)
    np.testing.assert_allclose(
        np.asarray(apply(params, longer_ids, longer_mask)[0][1, :3]), np.asarray(tokens[1, :3]), atol=1e-5
    )
    # A real token does influence the others (the encoder is contextual), except the forward-only GRU's past.
    changed = ids.at[1, 2].set((ids[1, 2] % 49) + 1)
    assert not np.allclose(np.asarray(apply(params, changed, mask)[0][1, 2]), np.asarray(tokens[1, 2]), atol=1e-5)


def test_bert_rejects_text_longer_than_its_positions():
    enc = get_text_encoder(dict(name="bert", vocab_size=50, width=32, depth=1, num_heads=4, mlp_dim=64, max_len=4))
    with pytest.raises(ValueError, match="exceeds BertEncoder.max_len=4"):
        jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 6), bool))


def test_unknown_encoder_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['cnn', 'pixels', 'resnet18', 'resnet50', 'vit'\]"):
        get_image_encoder(dict(name="resnet101"))
    with pytest.raises(ValueError, match=r"valid: \['bert', 'gru'\]"):
        get_text_encoder(dict(name="lstm"))


MS_SPEC = dict(name="cnn", width=16, channels=(8, 8, 16), strides=(2, 2, 2))


def test_multiscale_tokens_shapes_masks_and_per_scale_positions():
    enc = get_image_encoder(dict(MS_SPEC, scales=(1, 2)))
    image = jnp.asarray(RNG.normal(size=(2, 64, 64, 3)), jnp.float32)
    params = jax.jit(enc.init)(jax.random.key(0), image)
    tokens, mask = jax.jit(enc.apply)(params, image)
    assert token_grids(enc, (64, 64)) == [(16, 16), (8, 8)]
    assert tokens.shape == (2, 16 * 16 + 8 * 8, 16) and mask.shape == (2, 320) and bool(mask.all())
    p = params["params"]
    assert p["pos_emb_scale0"]["pos_embedding"].value.shape == (256, 16)
    assert p["pos_emb_scale1"]["pos_embedding"].value.shape == (64, 16)
    assert p["scale_embedding"].value.shape == (2, 16)
    # Each scale's position embedding moves only that scale's tokens.
    bumped = jax.tree.map(lambda x: x, params)
    bumped["params"]["pos_emb_scale1"]["pos_embedding"] = p["pos_emb_scale1"]["pos_embedding"].replace_boxed(
        p["pos_emb_scale1"]["pos_embedding"].value + 1.0
    )
    moved = np.asarray(jax.jit(enc.apply)(bumped, image)[0]) - np.asarray(tokens)
    np.testing.assert_allclose(moved[:, :256], 0.0, atol=1e-6)
    np.testing.assert_allclose(moved[:, 256:], 1.0, atol=1e-5)


def test_one_scale_equals_the_single_scale_encoder():
    single = get_image_encoder(MS_SPEC)
    one = get_image_encoder(dict(MS_SPEC, scales=(-1,)))
    image = jnp.asarray(RNG.normal(size=(2, 64, 64, 3)), jnp.float32)
    params = jax.jit(single.init)(jax.random.key(0), image)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(one.apply)(params, image)[0]), np.asarray(jax.jit(single.apply)(params, image)[0])
    )
    with pytest.raises(ValueError, match="must be distinct indices into 3 feature maps"):
        jax.eval_shape(get_image_encoder(dict(MS_SPEC, scales=(0, 3))).init, jax.random.key(0), image)


def test_cnn_max_pool_downsampling_equals_conv_then_pool():
    """downsample="max": each layer is a stride-1 conv + norm + ReLU, then a stride x stride max-pool; same grid."""
    spec = dict(name="cnn", width=16, channels=(4, 8), strides=(2, 2), norm="none", pos_emb="none")
    image = jnp.asarray(RNG.normal(size=(2, 16, 16, 3)), jnp.float32)
    enc_max = get_image_encoder(dict(spec, downsample="max"))
    params = enc_max.init(jax.random.key(0), image)
    tokens, mask = enc_max.apply(params, image)
    assert tokens.shape == (2, 4 * 4, 16) and bool(mask.all())
    p = jax.tree.map(np.asarray, unbox(params))["params"]
    x = np.asarray(image)
    for i in range(2):
        k = p[f"conv{i}"]["kernel"]
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = np.maximum(np.asarray(y) + p[f"conv{i}"]["bias"], 0.0)
        b, h, w, c = y.shape
        x = y.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    want = x.reshape(2, 16, 8) @ p["proj"]["kernel"] + p["proj"].get("bias", 0.0)  # the token projection
    np.testing.assert_allclose(np.asarray(tokens), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="downsample"):
        get_image_encoder(dict(spec, downsample="avg")).init(jax.random.key(0), image)


@pytest.mark.parametrize("hw", [16, 9])  # 9: an odd grid falls back to nn.max_pool's "SAME" padding
def test_max_pool_matches_reduce_window_values_and_gradients(hw):
    """vision._max_pool (reshape + max, fast on XLA:CPU) == nn.max_pool after a ReLU: values and input gradients."""
    import flax.linen as nn

    from vtfusion_jax.models.vision import _max_pool

    x = jnp.asarray(RNG.normal(size=(2, hw, hw, 5)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(2, (hw + 1) // 2, (hw + 1) // 2, 5)), jnp.float32)
    ref = lambda x: jnp.sum(nn.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2), padding="SAME") * w)  # noqa: E731
    ours = lambda x: jnp.sum(_max_pool(jax.nn.relu(x), 2) * w)  # noqa: E731
    np.testing.assert_allclose(float(ours(x)), float(ref(x)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax.grad(ours)(x)), np.asarray(jax.grad(ref)(x)))
