"""Eval's attention maps per fusion variant (issue 6 item 6, issue 10 item 1): for every attention variant the
same code eval.py runs (eval_lib._attention_maps) draws the question's attention over the image, per scale of
multi-scale tokens, co_attention's image -> text bars, query / bottleneck maps per learned token and the
gated_cross gate values. Tiny untrained models: the drawing, not the training, is under test."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testutil  # noqa: F401  (unoptimised XLA code generation and the compilation cache: fast tiny compiles)
from PIL import Image

from vtfusion_jax import eval_lib, train_lib, viz
from vtfusion_jax.config_lib import load_config

VARIANTS = ("merged", "cross", "co_attention", "gated_cross", "bottleneck", "query")
MULTI = ((16, 16), (8, 8))  # tiny CNN (8, 16) at 32 px with scales (0, 1)
QUESTIONS = ["what color is the circle?", "is there a red shape in the image?"]
LEARNED = 3  # learned queries / bottleneck tokens of the tiny query and bottleneck fusions
GATE = 0.5  # attn_gate parameter written into gated_cross: the figure must report tanh(0.5)


@functools.cache
def _restored(fusion: str, scales: tuple) -> eval_lib.Restored:
    """A Restored (what eval builds from a checkpoint) around freshly initialised tiny-model parameters."""
    c = load_config("configs/tiny.py")
    with c.unlocked():
        c.model.fusion.name = fusion
        c.model.fusion.num_layers = 2 if fusion == "bottleneck" else 1  # bottleneck's composed map needs two
        if fusion in ("query", "bottleneck"):  # few learned tokens: fewer panels to draw
            c.model.fusion[{"query": "num_queries", "bottleneck": "num_bottleneck"}[fusion]] = LEARNED
        c.model.image_encoder.scales = scales
    r = object.__new__(eval_lib.Restored)
    r.config, r.meta = c, {"label_names": ["yes", "no", "red", "circle"], "text_key": "question"}
    r.tokenizer = train_lib.make_tokenizer(c)
    r.model = train_lib.build_model(c, 4, r.tokenizer.vocab_size)
    r.sow_model = train_lib.build_model(c, 4, r.tokenizer.vocab_size, sow_weights=True)
    r.image_size, r.image_norm = 32, {"image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    params = jax.jit(r.model.init)(jax.random.key(0), train_lib.init_batch(c, {"image_shape": (32, 32, 3)}))["params"]
    if fusion == "gated_cross":
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.full_like(x, GATE) if "attn_gate" in jax.tree_util.keystr(p) else x, params
        )
    r.params = params
    return r


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 255, (32, 32, 3), np.uint8), "question": q.encode()} for q in QUESTIONS]


@pytest.mark.parametrize("fusion,scales", [(v, (0, 1)) for v in VARIANTS] + [("cross", ())], ids=lambda x: str(x))
def test_eval_draws_each_variants_attention(fusion, scales, source, tmp_path):
    r = _restored(fusion, scales)
    eval_lib._attention_maps(r, source, "question", str(tmp_path), len(source))
    index = json.loads((tmp_path / "attention_maps.json").read_text())
    assert sorted(index) == ["attention_00.png", "attention_01.png"]
    for png, entry in index.items():
        assert Image.open(tmp_path / png).size[0] > 200
        assert entry["fusion"] == fusion and entry["question"] in QUESTIONS
        panels = entry["panels"]
        main = [p for p in panels if p.startswith("question -> image")]
        if scales:  # one panel per scale, named by its grid
            assert len(main) == 2 and "16x16" in main[0] and "8x8" in main[1], panels
        else:
            assert main == ["question -> image"], panels
        assert any("image -> text" in p for p in panels) == (fusion == "co_attention"), panels
        per_scale = len(scales) or 1
        assert sum(p.startswith("query ") for p in panels) == (LEARNED * per_scale if fusion == "query" else 0), panels
        n_z = LEARNED * per_scale if fusion == "bottleneck" else 0
        assert sum(p.startswith("bottleneck token ") for p in panels) == n_z, panels
        if fusion == "gated_cross":
            assert entry["gates"] == pytest.approx([math.tanh(GATE)])  # one layer
        else:
            assert "gates" not in entry


def test_views_are_distributions_and_split_by_scale(source):
    """The question's map is a distribution over all N = 256 + 64 tokens of each example, padding question tokens
    excluded: changing a padded token's id leaves the map unchanged (its row is never counted)."""
    for fusion in VARIANTS:
        r = _restored(fusion, (0, 1))
        batch = {"image": np.zeros((2, 32, 32, 3), np.float32), **r.tokenizer(QUESTIONS)}
        _, views = r.attention_views(batch)
        att = views.text_to_image
        assert att.shape == (2, 320) and np.all(att >= 0), fusion
        np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-5)
        pieces = viz.split_scales(att[0], r.token_grids())
        assert [p.shape[0] for p in pieces] == [256, 64] and r.token_grids() == list(MULTI)
        if fusion == "co_attention":
            assert views.image_to_text.shape == (2, batch["text_ids"].shape[1])
        if fusion in ("cross", "gated_cross", "co_attention"):  # text queries: padded rows are excluded
            pad = batch["text_mask"][1].sum()
            changed = dict(batch, text_ids=batch["text_ids"].copy())
            changed["text_ids"][1, pad:] = 7  # different ids at padded positions (still masked out as keys)
            _, views2 = r.attention_views(changed)
            np.testing.assert_allclose(views2.text_to_image[1], att[1], rtol=1e-5, atol=1e-7)


def test_concat_has_no_maps(source, tmp_path, capsys):
    r = _restored("concat", ())
    eval_lib._attention_maps(r, source, "question", str(tmp_path), 2)
    assert "no attention maps" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
