"""docs/adding_a_variant.md, held to its word: the toy module printed there, written to a folder outside
vtfusion_jax/ and registered by its one decorator line, trains through train.py, appears in the generated variant
table with its FLOPs and gets its attention maps through viz, with no other edit. And the guide's worked example
inside the package, FiLM (vtfusion_jax/models/film.py), shown verbatim and held to its limiting cases."""

import importlib.util
import inspect
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testutil import REPO, config_flags, load_config, read_jsonl, run_script

from vtfusion_jax import flops, layers, models, viz
from vtfusion_jax.models import film, get_fusion
from vtfusion_jax.models.fusion import param_count
from vtfusion_jax.models.vtfusion import VisionTextModel

GUIDE = open(os.path.join(REPO, "docs", "adding_a_variant.md")).read()
TOY = re.search(r"```python\n(# my_fusions\.py\n.*?)```", GUIDE, re.S).group(1)  # the guide's module, verbatim
PLUGIN = dict(VTFUSION_PLUGINS="my_fusions")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy module in a folder outside the package, imported as VTFUSION_PLUGINS would; unregistered after."""
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "my_fusions.py").write_text(TOY)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("my_fusions")
        yield folder, module.ToyCross
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("my_fusions", None)
        models.FUSIONS.pop("toy_cross", None)


def test_toy_variant_trains_through_train_py(toy, tmp_path, monkeypatch):
    folder, _ = toy
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for key, value in PLUGIN.items():
        monkeypatch.setenv(key, value)
    flags = config_flags(train__num_steps=4, train__log_every_steps=1, train__eval_every_steps=-1)
    out = run_script(
        "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.model.fusion.name=toy_cross", *flags
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done at step 4" in out.stdout, out.stdout[-2000:]
    assert json.load(open(tmp_path / "config.json"))["model"]["fusion"]["name"] == "toy_cross"
    losses = [r["train/loss"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # Without the plugin the name is unknown, and the error lists the registered variants.
    monkeypatch.delenv("VTFUSION_PLUGINS")
    out = run_script(
        "train.py",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path}/x",
        "--config.model.fusion.name=toy_cross",
        *flags,
    )
    assert out.returncode != 0 and "unknown fusion 'toy_cross'" in out.stderr and "'film'" in out.stderr


def test_toy_variant_is_in_the_generated_table_with_its_flops(toy):
    _, toy_cls = toy
    spec = importlib.util.spec_from_file_location("fusion_table", os.path.join(REPO, "scripts", "fusion_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rows = {r["name"]: r for r in table.rows()}
    assert list(rows)[-1] == "toy_cross" and {"film", "probe"} <= set(rows)
    # FLOPs: the attention formula by hand (q, k, v, out projections; scores and values) and, independently, the
    # matmuls of the traced toy.
    d, lq, lk = table.SIZE["width"], table.TEXT_LEN, table.IMAGE_LEN
    by_hand = 2 * lq * d * d + 4 * lk * d * d + 2 * lq * d * d + 4 * lq * lk * d
    fusion = toy_cls(**table.SIZE)
    t, i = jnp.zeros((1, lq, d)), jnp.zeros((1, lk, d))
    mt, mi = jnp.ones((1, lq), bool), jnp.ones((1, lk), bool)
    traced = flops.jaxpr_flops(
        jax.make_jaxpr(lambda p: fusion.apply(p, t, mt, i, mi))(fusion.init(jax.random.key(0), t, mt, i, mi))
    )
    assert rows["toy_cross"]["flops"] == by_hand == traced
    assert rows["toy_cross"]["params"] == param_count(fusion, lq, lk) == 4 * (d * d + d) + 4 * d
    line = next(x for x in table.render_sections()["variants"].splitlines() if x.startswith("| `toy_cross` |"))
    assert f"| {by_hand / 1e6:,.1f} |" in line and "text -> image, one cross-attention" in line


def test_toy_variant_attention_maps_through_viz(toy, tmp_path):
    """The maps eval draws (viz.attention_views, with the name or found from the sown modules as eval calls it): a
    distribution over the image tokens per example, padded question tokens excluded; and the figure is written."""
    c = load_config("tiny")
    cfg = c.model.to_dict()
    cfg["text_encoder"]["vocab_size"] = 50
    cfg["fusion"].update(name="toy_cross", sow_weights=True)
    model = VisionTextModel(cfg, 4)
    rng = np.random.default_rng(0)
    mask = np.arange(16)[None] < np.array([[16], [5]])
    batch = dict(
        image=jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),
        text_ids=jnp.asarray(rng.integers(1, 50, (2, 16)) * mask, jnp.int32),
        text_mask=jnp.asarray(mask),
    )
    variables = model.init(jax.random.key(0), batch)
    _, state = model.apply(variables, batch, mutable=["intermediates"])
    views = viz.attention_views(state["intermediates"], mask, 64, "toy_cross")
    assert views.text_to_image.shape == (2, 64) and views.how == "text -> image cross-attention"
    np.testing.assert_allclose(views.text_to_image.sum(-1), 1.0, rtol=1e-5)
    sown = np.asarray(state["intermediates"]["fusion"]["toy_attn"]["attention_weights"][0]).mean(1)  # [B, L, N]
    np.testing.assert_allclose(views.text_to_image[1], sown[1, :5].mean(0), rtol=1e-5)  # real question rows only
    found = viz.attention_views(state["intermediates"], mask, 64)
    np.testing.assert_array_equal(found.text_to_image, views.text_to_image)
    panels = viz.save_attention_figure(str(tmp_path / "a.png"), np.zeros((32, 32, 3)), views, 1)
    assert panels == ["image", "question -> image"] and (tmp_path / "a.png").stat().st_size > 1000
    info = models.fusion_info("toy_cross")
    assert info.attention_based and not info.has_gates and info.pooled_width(get_fusion({"name": "toy_cross"})) == 128


# ----------------------------------------------------------------------------- FiLM, the worked example

B, L, N, D = 2, 6, 9, 32
TEXT_MASK = jnp.asarray(np.arange(L)[None, :] < np.array([[L], [3]]))
IMAGE_MASK = jnp.asarray(np.arange(N)[None, :] < np.array([[7], [N]]))
RNG = np.random.default_rng(0)
TEXT = jnp.asarray(RNG.normal(size=(B, L, D)), jnp.float32)
IMAGE = jnp.asarray(RNG.normal(size=(B, N, D)), jnp.float32)


def test_the_guide_shows_film_verbatim_with_its_registry_line():
    assert inspect.getsource(film.FiLMFusion) in GUIDE  # the class and its @register_fusion line
    assert models.fusion_info("film").cls is film.FiLMFusion and type(get_fusion({"name": "film"})) is film.FiLMFusion


def _randomize(params, seed=7):
    leaves, tree = jax.tree.flatten(layers.unbox(params))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def test_film_zero_layers_is_concat():
    """No FiLM layer: exactly ``concat`` ([masked_mean(text); masked_mean(image)]) with the same projections."""
    zero = get_fusion(dict(name="film", width=D, num_layers=0))
    concat = get_fusion(dict(name="concat", width=D))
    t, i = TEXT[..., :16], IMAGE[..., :24]  # other widths: the input projections are in play
    params = zero.init(jax.random.key(1), t, TEXT_MASK, i, IMAGE_MASK)
    for a, b in zip(*(f.apply(params, t, TEXT_MASK, i, IMAGE_MASK) for f in (zero, concat)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_film_question_blind_at_init_and_known_modulation():
    """Zero-initialised generator: gamma = beta = 0, so the image tokens ignore the question; once it is on they do
    not. And gamma = -1, beta = 0 silences the branch: each layer then adds only its output bias."""
    fusion = get_fusion(dict(name="film", width=D, num_layers=2))
    params = fusion.init(jax.random.key(0), TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)
    apply = jax.jit(lambda p, t, i: fusion.apply(p, t, TEXT_MASK, i, IMAGE_MASK))
    other_question = TEXT[::-1]
    np.testing.assert_allclose(apply(params, TEXT, IMAGE)[1], apply(params, other_question, IMAGE)[1], atol=1e-6)
    on = _randomize(params)
    assert not np.allclose(np.asarray(apply(on, TEXT, IMAGE)[1]), np.asarray(apply(on, other_question, IMAGE)[1]))
    p = layers.unbox(on)
    for k in range(2):
        p["params"][f"film{k}"]["kernel"] = jnp.zeros_like(p["params"][f"film{k}"]["kernel"])
        p["params"][f"film{k}"]["bias"] = jnp.concatenate([-jnp.ones(D), jnp.zeros(D)])
    expected = IMAGE + p["params"]["out0"]["bias"] + p["params"]["out1"]["bias"]
    np.testing.assert_allclose(np.asarray(apply(p, TEXT, IMAGE)[1]), np.asarray(expected), atol=1e-5)


def test_film_analytic_flops_within_10_percent_of_xla():
    fusion = get_fusion(dict(name="film", width=256, num_layers=2))
    t, i = jnp.zeros((1, 16, 256)), jnp.zeros((1, 64, 256))
    mt, mi = jnp.ones((1, 16), bool), jnp.ones((1, 64), bool)
    params = jax.eval_shape(fusion.init, jax.random.key(0), t, mt, i, mi)
    cost = jax.jit(fusion.apply).lower(params, t, mt, i, mi).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert abs(fusion.flops_per_example(16, 64) - cost["flops"]) / cost["flops"] < 0.10


@pytest.mark.parametrize("bad", [dict(num_layer=2), dict(image_pool="max")])
def test_unknown_fields_are_refused(bad):
    with pytest.raises(ValueError, match="film"):
        get_fusion(dict(name="film", **bad))


def test_unknown_names_list_the_registered_variants():
    with pytest.raises(ValueError, match=r"unknown fusion 'nope'; valid: \[.*'film'.*'probe'"):
        models.fusion_info("nope")
    with pytest.raises(ValueError, match="unknown fusion 'nope'"):
        get_fusion({"name": "nope"})
