"""Captioning with model.memory = "fused" (models/caption.py): the decoder reads the fusion's output tokens for
(learned prompt, image); the fusion is really in the path (its parameters get gradients and change the logits);
KV-cache decoding still equals uncached decoding; both memory settings train a step of the caption task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_testutil

from vtfusion_jax import decoding, optim, sharding, tasks, train_lib
from vtfusion_jax.models.caption import CaptionModel

V, T, P, PAD, BOS, EOS = 11, 8, 3, 0, 1, 2
IMAGE = dict(name="cnn", channels=(4, 8), strides=(2, 2), norm="group", pos_emb="learn")  # 16 px -> 4x4 tokens
HEAD = dict(name="caption_decoder", num_layers=1, num_heads=2, mlp_dim=32, max_len=T)
# cross: only the prompt stream changes (the image tokens come back as they went in), the harder case for "fused"
FUSION = dict(name="cross", num_layers=1, num_heads=2, mlp_dim=32)
FUSED = dict(width=16, dtype="float32", image_encoder=IMAGE, head=HEAD, memory="fused", prompt_len=P, fusion=FUSION)


def tiny_caption_config():
    """configs/sort_of_clevr_caption.py at the smallest size: 8 training images, width 16, one device."""
    c = train_testutil.load_config("sort_of_clevr_caption")
    c.dataset.builder_kwargs = dict(num_train=8, num_validation=4, num_test=4, seed=0)
    c.mesh_shape = (1, 1, 1)
    c.model.width = 16
    c.model.image_encoder = dict(c.model.image_encoder, channels=(4, 8, 8))
    c.model.head = dict(c.model.head, num_layers=1, mlp_dim=32, num_heads=2)
    c.model.fusion = dict(c.model.fusion, name="cross", mlp_dim=32, num_heads=2)
    c.model.prompt_len = 2
    c.optim.warmup_steps = 0  # the one step under test moves every parameter
    c.optim.schedule = "constant"
    c.train.global_batch_size = 4
    return c


@pytest.fixture(scope="module")
def fused():
    model = CaptionModel(FUSED, V)
    batch = {"image": jnp.zeros((1, 16, 16, 3)), "caption_in": jnp.zeros((1, T), jnp.int32)}
    params = sharding.unbox(jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, batch)["params"])
    params["head"]["logits"]["kernel"] = params["head"]["logits"]["kernel"] * 8.0  # peaky, image-dependent outputs
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
    return model, params, images


def test_fused_memory_is_prompt_plus_image_tokens_and_the_fusion_is_in_the_path(fused):
    model, params, images = fused
    assert set(params) == {"image_encoder", "fusion", "head"} and params["fusion"]["prompt"].shape == (P, 16)
    encode = jax.jit(lambda p: model.apply({"params": p}, images, method=CaptionModel.encode_memory))
    memory, mask = encode(params)
    assert memory.shape == (3, P + 16, 16) and mask.shape == (3, P + 16) and bool(mask.all())
    tokens = {"image": images, "caption_in": jax.random.randint(jax.random.PRNGKey(2), (3, T), 3, V)}

    def loss(p):
        return jnp.mean(model.apply({"params": p}, tokens)["logits"] ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    norm = lambda tree: float(optax.tree_utils.tree_norm(tree))  # noqa: E731
    assert norm(grads["fusion"]["prompt"]) > 0 and norm(grads["fusion"]["variant"]) > 0
    # The prompt tokens leave the fusion carrying the image (cross only changes that stream): they differ between
    # images, and stop differing when the fusion's cross-attention output is cut.
    prompt_part = lambda p: encode(p)[0][:, :P]  # noqa: E731
    cut = jax.tree.map(lambda x: x, params)  # new containers, same arrays
    out = cut["fusion"]["variant"]["blocks"]["layers_0"]["cross_attn"]["out"]
    out["kernel"] = jnp.zeros_like(out["kernel"])
    fused_prompt, cut_prompt = np.asarray(prompt_part(params)), np.asarray(prompt_part(cut))
    assert not np.allclose(fused_prompt[0], fused_prompt[1], atol=1e-5)
    np.testing.assert_allclose(cut_prompt[0], cut_prompt[1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(memory[:, :P]), fused_prompt)


def test_memory_switch_changes_the_model():
    image_only = CaptionModel(dict(FUSED, memory="image"), V)
    batch = {"image": jnp.zeros((1, 16, 16, 3)), "caption_in": jnp.zeros((1, T), jnp.int32)}
    shapes = jax.eval_shape(image_only.init, {"params": jax.random.PRNGKey(0)}, batch)["params"]
    assert set(shapes) == {"image_encoder", "head"}  # no fusion parameters with memory "image"
    with pytest.raises(ValueError, match=r"unknown model.memory 'text'"):
        jax.eval_shape(CaptionModel(dict(FUSED, memory="text"), V).init, {"params": jax.random.PRNGKey(0)}, batch)


@pytest.mark.parametrize("method,beam", [("greedy", 1), ("beam", 2)])
def test_kv_cache_matches_uncached_with_fused_memory(fused, method, beam):
    model, params, images = fused

    def run(use_cache):
        fn = jax.jit(
            lambda p, x: decoding.decode_captions(
                model, p, x, method=method, beam_size=beam, max_len=T - 1, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                use_cache=use_cache,
            )
        )  # fmt: skip
        return jax.device_get(fn(params, images))

    a, b = run(True), run(False)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-5)
    assert len(set(np.round(a["score"], 5))) > 1  # image-dependent outputs: the comparison means something


@pytest.mark.parametrize("memory", ["image", "fused"])
def test_caption_task_trains_a_step_with_each_memory(memory):
    config = tiny_caption_config()
    config.model.memory = memory
    task = tasks.make_task(config)
    tx, _ = optim.make_optimizer(config.optim, 10, optim.frozen_towers(config.model))
    step_fn = train_lib.make_train_step(task.loss, tx)  # the loop's step: task.loss, grads, AdamW

    @jax.jit  # init and one step in one program (one compilation)
    def init_and_step(batch):
        params = sharding.unbox(task.model.init({"params": jax.random.PRNGKey(0)}, task.init_batch())["params"])
        state = train_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(1))
        new, m = step_fn(state, batch)
        return params, new.params, m

    it = task.train_iter(0)
    with jax.set_mesh(task.mesh), sharding.activation_rules():
        before, after, m = jax.device_get(init_and_step(next(it)))
    it.close()
    assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0
    assert ("fusion" in after) == (memory == "fused")
    for tower in after:  # every tower trained, the fusion (prompt and variant) included when it exists
        for part in after[tower] if tower == "fusion" else [None]:
            a, b = (before[tower], after[tower]) if part is None else (before[tower][part], after[tower][part])
            pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
            assert any(not np.array_equal(x, y) for x, y in pairs), (tower, part)
