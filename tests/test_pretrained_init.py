"""model.<tower>.init_from in training: a tiny random BERT saved with transformers is the text tower's checkpoint.

The tower's architecture comes from the checkpoint's config.json, its params after init are the converted
checkpoint (placed with the state's shardings), a frozen tower stays bit-identical through training while the
other towers change, and a resumed run never re-imports.
"""

import jax
import numpy as np
import pytest
from train_testutil import load_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vtfusion_jax import optim, pretrained, pretrained_init, tasks, train_lib  # noqa: E402
from vtfusion_jax.data import pipeline  # noqa: E402

# Hidden size 32 = the tiny config's width; 2 layers and post-LN differ from the tiny config's own text tower
# (1 pre-LN layer), so a model built from the config instead of the checkpoint has a different tree. The vocabulary
# is the tokenizer's (MiniLM WordPiece, 30522).
TINY_BERT = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=24,
    type_vocab_size=2,
)
# 4 steps; the first run stops (with a checkpoint) after 3, so that the resume runs the same compiled step.
STEPS = dict(
    train__num_steps=4,
    train__steps_per_run=3,
    train__log_every_steps=1,
    train__eval_every_steps=-1,
    train__checkpoint_every_steps=100,
)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT)).eval()
    with torch.no_grad():  # every tensor random (HF inits biases / LayerNorms to constants our init shares)
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape) + (1.0 if p.ndim == 1 else 0.0) * torch.rand(()))
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _config(folder, freeze=True, **overrides):
    config = load_config("tiny", **{**STEPS, **overrides})
    with config.unlocked():
        config.model.text_encoder = dict(init_from=folder, freeze=freeze, dropout_rate=0.1)
    return config


def _fresh_state(config):
    """What train_and_evaluate builds before its loop on a fresh run: model, init state, imported towers."""
    task = tasks.make_task(config)
    model = task.model
    tx, _ = optim.make_optimizer(config.optim, 10, optim.frozen_towers(config.model))
    state, state_sh = train_lib.create_train_state(model, task.init_batch(), tx, task.mesh, config.seed)
    size = task.image_size
    return model, state, state_sh, pretrained_init.import_into_state(state, state_sh, model.model_config, size, 0)


def _leaves(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_init_from_imports_the_checkpoint_and_freeze_keeps_it(bert_folder, tmp_path, monkeypatch):
    config = _config(bert_folder, freeze=True)
    _, expected = pretrained.load_text_encoder(bert_folder, dropout_rate=0.1)
    model, init, state_sh, state = _fresh_state(config)

    # Architecture from config.json (not the tiny config's 1-layer pre-LN tower).
    spec = model.model_config["text_encoder"]
    assert (spec["width"], spec["depth"], spec["mlp_dim"], spec["post_ln"]) == (32, 2, 48, True)
    # After init: exactly the converted checkpoint, laid out with the state's shardings; other towers untouched.
    want = _leaves(expected)
    got = _leaves(state.params["text_encoder"])
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    shardings = jax.tree.leaves(state_sh.params["text_encoder"])
    for x, s in zip(jax.tree.leaves(state.params["text_encoder"]), shardings, strict=True):
        assert x.sharding == s
    assert state.params["head"] is init.params["head"]
    assert not any(np.array_equal(got[k], v) for k, v in _leaves(init.params["text_encoder"]).items() if k in got)

    # A few steps of training: the frozen tower is bit-identical, every other tower moved.
    workdir = str(tmp_path / "run")
    assert train_lib.train_and_evaluate(config, workdir)["step"] == 3

    trained = train_lib.restore(config, workdir, "latest")[1]
    after = _leaves(trained["text_encoder"])
    for k in want:
        np.testing.assert_array_equal(after[k], want[k], err_msg=k)
    for tower in ("image_encoder", "fusion", "head"):
        before, now = _leaves(init.params[tower]), _leaves(trained[tower])
        assert any(not np.array_equal(before[k], now[k]) for k in before), tower

    # Resuming (one more step) restores the run's checkpoint and never imports the weights again.
    def no_import(*a, **k):
        raise AssertionError("a resumed run re-imported the pretrained weights")

    monkeypatch.setattr(pretrained_init, "import_into_params", no_import)
    assert train_lib.train_and_evaluate(config, workdir)["step"] == 4


def test_image_checkpoint_statistics_reach_the_pipeline(tmp_path, monkeypatch):
    """A ViT checkpoint's preprocessor mean / std are what train_and_evaluate hands the input pipeline."""
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=32,
            patch_size=8,
        )
    )
    vit.save_pretrained(str(tmp_path / "vit"), safe_serialization=True)
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    transformers.ViTImageProcessor(image_mean=mean, image_std=std, size={"height": 32, "width": 32}).save_pretrained(
        str(tmp_path / "vit")
    )
    config = load_config("tiny", **STEPS)
    with config.unlocked():
        config.model.image_encoder = dict(init_from=str(tmp_path / "vit"), freeze=True)
    seen = {}

    class Stop(Exception):
        pass

    def capture(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(pipeline, "make_train_iterator", capture)
    with pytest.raises(Stop):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    np.testing.assert_allclose(seen["image_mean"], mean)
    np.testing.assert_allclose(seen["image_std"], std)
    # Without init_from the pipeline keeps its defaults.
    assert pretrained_init.image_normalization({"image_encoder": {"name": "cnn"}}) == {
        "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5),
    }


def test_init_from_errors_name_the_key(bert_folder):
    base = {"name": "bert", "init_from": bert_folder}
    with pytest.raises(ValueError, match=r"model.text_encoder.name='gru'.*bert"):
        pretrained_init.resolve_model_spec({"text_encoder": {**base, "name": "gru"}})
    with pytest.raises(ValueError, match=r"vocab_size 30522 but the tokenizer has 100"):
        pretrained_init.resolve_model_spec({"text_encoder": {**base, "vocab_size": 100}})
    with pytest.raises(ValueError, match=r"model_type 'bert'.*supported"):
        pretrained_init.resolve_model_spec({"image_encoder": {"init_from": bert_folder}})
    # A params tree whose shape differs from the checkpoint's: the error names the parameter path.
    spec = pretrained_init.resolve_model_spec({"text_encoder": {"init_from": bert_folder}})
    _, params = pretrained.load_text_encoder(bert_folder)
    bad = jax.tree.map(lambda x: x, params)
    bad["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"] = np.zeros((32, 49), np.float32)
    shardings = jax.tree.map(lambda x: None, bad)
    with pytest.raises(ValueError, match=r"text_encoder/encoder/layers_1/mlp/fc1/kernel: checkpoint shape \(32, 48\)"):
        pretrained_init.import_into_params(
            {"text_encoder": bad}, {"text_encoder": shardings}, spec, 32, jax.random.key(0)
        )
