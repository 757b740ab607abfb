"""CLIP and SigLIP two-tower imports: our towers, projections and zero-shot logits equal transformers'.

Tiny random-weight CLIPModel / SiglipModel files (every weight randomised, test_pretrained._randomise) are imported
with vtfusion_jax.pretrained; texts of different lengths are padded under an attention mask, images come in a batch.
Embeddings and logits (CLIP: exp(logit_scale) * cosine; SigLIP: + logit_bias) must match to 1e-5 in float32.
"""

import os

import jax
import numpy as np
import pytest
from train_testutil import load_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import test_data_coco  # noqa: E402
from test_pretrained import _images, _randomise, _save  # noqa: E402

from vtfusion_jax import layers, pretrained, pretrained_init  # noqa: E402
from vtfusion_jax.models import get_image_encoder, get_text_encoder  # noqa: E402
from vtfusion_jax.models.retrieval import RetrievalModel, itc_logits  # noqa: E402

coco_dir = test_data_coco.coco_dir  # the tiny COCO folder fixture
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
VISION = dict(TOWER, image_size=16, patch_size=4)
EOS = 39  # the largest id, as CLIP's <|endoftext|>: the legacy (eos_token_id == 2) argmax rule finds it too
TEXT = dict(TOWER, vocab_size=EOS + 1, max_position_embeddings=10, bos_token_id=38, eos_token_id=EOS, pad_token_id=1)
LENGTHS = (7, 4, 2)


def _texts(pad_id):
    """[BOS] random [EOS] then padding (pad_id) in rows of LENGTHS real tokens; int32 ids [3, 7], bool mask."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 38, size=(len(LENGTHS), max(LENGTHS))).astype(np.int32)
    mask = np.arange(ids.shape[1])[None] < np.array(LENGTHS)[:, None]
    ids[:, 0] = 38
    ids[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1] = EOS
    return np.where(mask, ids, pad_id).astype(np.int32), mask


def _ours(folder, ids, mask, images):
    """Our L2-normalised (image, text) embeddings, the text tokens and the zero-shot logits text x image."""
    spec, params = pretrained.load_text_encoder(folder, pooler=True)
    enc = get_text_encoder(spec)
    tokens, _, txt = jax.jit(lambda p, i, m: enc.apply({"params": p}, i, m, return_pooled=True))(params, ids, mask)
    spec, params = pretrained.load_image_encoder(folder, pooler=True)
    vit = get_image_encoder(spec)
    _, _, img = jax.jit(lambda p, x: vit.apply({"params": p}, x, return_pooled=True))(params, images)
    img, txt = (np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True) for x in (img, txt))
    scale, bias = pretrained.load_logit_scale(folder)
    return img, txt, np.asarray(tokens), np.asarray(itc_logits(img, txt, np.exp(-scale), bias))


def _check(model, folder, ids, mask, final_hidden):
    x, xt = _images(3, 16)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    pixel_values=xt)  # fmt: skip
    img, txt, tokens, logits = _ours(folder, ids, mask, x)
    np.testing.assert_allclose(img, ref.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(txt, ref.text_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits.T, ref.logits_per_image.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits, ref.logits_per_text.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(tokens[mask], final_hidden(ref)[mask], atol=1e-5)
    assert np.all(tokens[~mask] == 0.0)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    model = _randomise(transformers.CLIPModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))  # tau = 0.05, inside the retrieval head's clip range
    return model, _save(model, tmp_path_factory.mktemp("clip"))


def test_clip_towers_projections_and_logits_match_transformers(clip_folder):
    """Causal text tower pooled at the first EOS (CLIP pads with EOS) + text projection; CLS + visual projection.
    A legacy config (eos_token_id 2) pools at the largest id, never at id 2."""
    model, folder = clip_folder
    ids, mask = _texts(pad_id=EOS)
    spec, params = pretrained.load_text_encoder(folder, pooler=True)
    assert spec["causal"] and spec["pool"] == "eos" and spec["proj_dim"] == 24 and not spec["proj_bias"]
    _check(model, folder, ids, mask, lambda ref: ref.text_model_output.last_hidden_state.numpy())
    # Causal: a real token's output does not depend on the tokens after it.
    enc = get_text_encoder(spec)
    apply = jax.jit(lambda t: enc.apply({"params": params}, t, mask, return_pooled=True))
    later = ids.copy()
    later[0, 5] = 7
    a, b = (np.asarray(apply(t)[0]) for t in (ids, later))
    np.testing.assert_array_equal(a[0, :5], b[0, :5])
    assert np.abs(a[0, 5:] - b[0, 5:]).max() > 1e-3
    # Legacy: HF takes the argmax id when the config says 2; a 2 in the text must not move the pooled token.
    ids[:, 1] = 2
    model.text_model.eos_token_id = 2
    spec, params = pretrained.load_text_encoder(folder, pooler=True, eos_token_id=2)
    enc = get_text_encoder(spec)
    _, _, txt = jax.jit(lambda p, i: enc.apply({"params": p}, i, mask, return_pooled=True))(params, ids)
    with torch.no_grad():
        want = model.get_text_features(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
    model.text_model.eos_token_id = EOS
    np.testing.assert_allclose(np.asarray(txt), want.pooler_output.numpy(), atol=1e-5)


def test_siglip_towers_heads_and_logits_match_transformers(tmp_path):
    """No CLS, attention-pooling head on the image side; text pooled at the last (padding) position + head;
    logits exp(scale) * cos + bias."""
    cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    model = _randomise(transformers.SiglipModel(cfg))
    folder = _save(model, tmp_path)
    ids, mask = _texts(pad_id=1)
    spec, params = pretrained.load_image_encoder(folder, pooler=True)
    assert not spec["use_cls"] and spec["pool"] == "map" and "map" in params
    # model.head.init_from: tau and the bias go into a sigmoid head; a head without a bias is refused.
    scale, bias = pretrained.load_logit_scale(folder)
    head = {"log_temperature": np.float32(0.0), "logit_bias": np.float32(0.0)}
    assert pretrained_init._head_params(head, folder) == {"log_temperature": -scale, "logit_bias": np.float32(bias)}
    with pytest.raises(ValueError, match="contrastive='sigmoid'"):
        pretrained_init._head_params({"log_temperature": np.float32(0.0)}, folder)
    _check(model, folder, ids, mask, lambda ref: ref.text_model_output.last_hidden_state.numpy())


def test_towers_without_pooler_leave_the_heads_out(tmp_path):
    """pooler=False (the default): the projections / heads are knowingly skipped, the trees have none of them."""
    cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    folder = _save(_randomise(transformers.SiglipModel(cfg)), tmp_path)
    spec, params = pretrained.load_image_encoder(folder)
    assert "pool" not in spec and "map" not in params
    spec, params = pretrained.load_text_encoder(folder)
    assert "proj" not in params and "proj_dim" not in spec


def test_retrieval_model_from_config_starts_itc_at_clip(clip_folder):
    """configs/coco_retrieval.py:init=clip with the tiny CLIP folder: after init + import, the model's ITC logits
    (text x image) are transformers' logits_per_text, i.e. logits_per_image transposed."""
    model, folder = clip_folder
    small = dict(model__width=32, model__fusion__num_layers=1, model__fusion__num_heads=4, model__fusion__mlp_dim=64)
    config = load_config("coco_retrieval", f"init=clip,init_from={folder}", **small)
    spec = pretrained_init.resolve_model_spec(config.model.to_dict())
    ours = RetrievalModel(spec)
    x, xt = _images(3, 16)
    ids, mask = _texts(pad_id=EOS)
    batch = {"image": x, "text_ids": ids, "text_mask": mask}
    params = layers.unbox(jax.jit(ours.init)(jax.random.key(0), batch)["params"])
    params = pretrained_init.import_into_params(
        params, jax.tree.map(lambda a: a.sharding, params), spec, 16, jax.random.key(1)
    )

    def itc(m, b):  # the model's ITC path (RetrievalTask.loss): the fusion does not enter it
        img, txt = m.encode_image(b["image"])[2], m.encode_text(b["text_ids"], b["text_mask"])[2]
        return {"itc_logits": m.itc(img, txt)[1], "temperature": m.temperature(), "image_emb": img}

    out = jax.jit(lambda p, b: ours.apply({"params": p}, b, method=itc))(params, batch)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    pixel_values=xt)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out["itc_logits"]).T, ref.logits_per_image.numpy(), atol=1e-5, rtol=1e-5)
    assert float(out["temperature"]) == pytest.approx(0.05, rel=1e-6)
    np.testing.assert_allclose(np.asarray(out["image_emb"]), ref.image_embeds.numpy(), atol=1e-5)


def test_checkpoint_tokenizer_pads_truncates_and_keeps_the_end_token():
    """The tokenizer a pretrained text tower reads (here MiniLM's): fixed length, right padding with its pad id,
    truncation keeps the end token, the mask marks the real tokens."""
    tok = pretrained.CheckpointTokenizer("minilm", max_len=6)
    out = tok(["a red circle", "how many objects are left of the small green rectangle"])
    ids, mask = out["text_ids"], out["text_mask"]
    assert ids.shape == mask.shape == (2, 6) and ids.dtype == np.int32 and tok.size == 30522
    assert mask[0].tolist() == [True] * 5 + [False] and ids[0, 5] == tok.pad_id and mask[1].all()
    assert ids[0, 4] == ids[1, 5] == 102  # [SEP] closes the short and the truncated text
    assert not tok.attend_padding


def _tiny_clip_with_tokenizer(folder):
    """A tiny random CLIPModel + a character-level CLIP BPE tokenizer (no merges) saved together in ``folder``."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.":
        vocab.update({ch: len(vocab), ch + "</w>": len(vocab) + 1})
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(TOWER, vocab_size=len(tok), max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = _randomise(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION)))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))
    tok.save_pretrained(str(folder))
    return model, _save(model, folder)


@pytest.mark.slow  # ~30 s: a COCO build, 3 training steps, ITC + ITM evaluation
def test_coco_retrieval_init_clip_trains_and_evaluates(coco_dir, tmp_path):
    """configs/coco_retrieval.py:init=clip,init_from=<tiny CLIP + tokenizer> through train.py's loop: the towers and
    tau are imported (tau stays ~0.05 at lr 1e-4 for 3 steps), the checkpoint's tokenizer feeds the text tower, and
    the test split is evaluated."""
    from vtfusion_jax import eval_lib, train_lib

    _, folder = _tiny_clip_with_tokenizer(tmp_path / "clip")
    c = load_config("coco_retrieval", f"coco={coco_dir},init=clip,init_from={folder}")
    c.dataset.builder_kwargs.update(image_size=16, max_images=100)
    c.model.width = 16
    c.model.fusion = dict(c.model.fusion, num_layers=1, num_heads=2, mlp_dim=32)
    c.eval.rerank_k = 2
    c.train.update(global_batch_size=8, num_steps=3, log_every_steps=1, eval_every_steps=3, eval_batch_size=8)
    c.train.checkpoint_every_steps = 3
    wd = str(tmp_path / "run")
    assert train_lib.train_and_evaluate(c, wd)["step"] == 3
    m = eval_lib.evaluate_split(c, wd, "test", "latest")
    assert m["num_images"] == 3 and m["num_texts"] == 15
    assert m["temperature"] == pytest.approx(0.05, rel=0.01)
    assert not os.path.exists(os.path.join(wd, "vocab.json"))  # the checkpoint's tokenizer, no word vocabulary
