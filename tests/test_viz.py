"""Attention maps per fusion variant (viz.attention_views, what eval draws), derived from each registry entry's
attention roles: for every attention variant the question's attention over the image (per scale of multi-scale
tokens), image -> text bars, one map per learned token, padded question tokens excluded; none for the others; gate
values of gated variants. Tiny untrained models: the maps, not the training, are under test."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_testutil import load_config

from vtfusion_jax import viz
from vtfusion_jax.models import FUSIONS, get_image_encoder, vision
from vtfusion_jax.models.vtfusion import VisionTextModel, shared_settings

ATTENTION = [n for n, info in FUSIONS.items() if info.attention_based]
MULTI = ((16, 16), (8, 8))  # tiny CNN (8, 16) at 32 px with scales (0, 1)
LEARNED = 3  # learned queries / bottleneck tokens
GATE = 0.5  # attn_gate parameter written into gated variants: gate_values must read tanh(0.5)
MASK = np.arange(16)[None] < np.array([[16], [6]])  # the second question has 10 padded tokens


def _batch(text_ids=None):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (2, 16)) * MASK if text_ids is None else text_ids
    return dict(
        image=jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),
        text_ids=jnp.asarray(ids, jnp.int32),
        text_mask=jnp.asarray(MASK),
    )


@functools.cache
def _model(fusion: str, scales: tuple):
    """(jitted apply(batch) -> intermediates, params, token grids) of the tiny model with this fusion."""
    cfg = load_config("tiny").model.to_dict()
    cfg["text_encoder"]["vocab_size"] = 50
    cfg["image_encoder"]["scales"] = scales
    have = {f.name for f in dataclasses.fields(FUSIONS[fusion].cls)} - {"name", "parent"}
    # Two layers: bottleneck's composed map needs them.
    extra = dict(num_layers=2, num_queries=LEARNED, num_bottleneck=LEARNED, sow_weights=True)
    cfg["fusion"] = dict(name=fusion, **{k: v for k, v in {**cfg["fusion"], **extra}.items() if k in have})
    model = VisionTextModel(cfg, 4)
    params = model.init(jax.random.key(0), _batch())["params"]
    if FUSIONS[fusion].has_gates:
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.full_like(x, GATE) if "attn_gate" in jax.tree_util.keystr(p) else x, params
        )
    apply = jax.jit(lambda b: model.apply({"params": params}, b, mutable=["intermediates"])[1].get("intermediates", {}))
    encoder = get_image_encoder(cfg["image_encoder"], shared_settings(cfg))
    return apply, params, [tuple(g) for g in vision.token_grids(encoder, (32, 32))]


@pytest.mark.parametrize("fusion,scales", [(v, (0, 1)) for v in ATTENTION] + [("cross", ())], ids=str)
def test_each_attention_variant_gets_its_maps(fusion, scales, tmp_path):
    apply, params, grids = _model(fusion, scales)
    roles = FUSIONS[fusion].attention_maps
    intermediates = apply(_batch())
    n = 320 if scales else 64  # 16x16 + 8x8 tokens, or the last scale's 8x8
    views = viz.attention_views(intermediates, MASK, sum(h * w for h, w in grids), fusion)
    assert views.text_to_image.shape == (2, n) and np.all(views.text_to_image >= 0)
    np.testing.assert_allclose(views.text_to_image.sum(-1), 1.0, rtol=1e-5)
    # eval's call without the name finds the same maps from the sown modules
    found = viz.attention_views(intermediates, MASK, n)
    np.testing.assert_allclose(found.text_to_image, views.text_to_image, rtol=1e-6)
    assert (views.image_to_text is not None) == ("image_to_text" in roles)
    learned = "query_to_image" in roles or "text_stream" in roles
    assert (views.per_token is not None) == learned and (not learned or views.per_token.shape == (2, LEARNED, n))

    panels = viz.save_attention_figure(str(tmp_path / "a.png"), np.zeros((32, 32, 3)), views, 1, grids)
    assert Image.open(tmp_path / "a.png").size[0] > 200
    main = [p for p in panels if p.startswith("question -> image")]
    if scales:  # one panel per scale, named by its grid
        assert grids == list(MULTI) and len(main) == 2 and "16x16" in main[0] and "8x8" in main[1], panels
        assert [p.shape[0] for p in viz.split_scales(views.text_to_image[0], grids)] == [256, 64]
    else:
        assert main == ["question -> image"], panels
    assert any("image -> text" in p for p in panels) == ("image_to_text" in roles), panels
    assert sum(p.startswith(views.per_token_name + " ") for p in panels) == (LEARNED * len(main) if learned else 0)
    assert viz.gate_values(params["fusion"]) == (
        pytest.approx([math.tanh(GATE)] * 2) if FUSIONS[fusion].has_gates else []
    )


@pytest.mark.parametrize("fusion", [v for v in ATTENTION if "text_to_image" in FUSIONS[v].attention_maps])
def test_padded_question_tokens_never_count(fusion):
    """Text-query maps average the real question rows only: other ids at padded positions change nothing."""
    apply, _, grids = _model(fusion, (0, 1))
    ids = np.random.default_rng(0).integers(1, 50, (2, 16)) * MASK
    views = viz.attention_views(apply(_batch(ids)), MASK, 320, fusion)
    changed = viz.attention_views(apply(_batch(np.where(MASK, ids, 7))), MASK, 320, fusion)
    np.testing.assert_allclose(changed.text_to_image[1], views.text_to_image[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fusion", [v for v in FUSIONS if not FUSIONS[v].attention_based])
def test_variants_without_attention_have_no_maps(fusion):
    apply, params, _ = _model(fusion, ())
    assert viz.attention_views(apply(_batch()), MASK, 64, fusion).text_to_image is None
    assert viz.attention_views(apply(_batch()), MASK, 64).text_to_image is None
    assert viz.gate_values(params.get("fusion", {})) == []
