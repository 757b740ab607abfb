"""Caption decoder: KV-cache decoding == uncached decoding (tokens and scores), beam size 1 == greedy, teacher forcing
is causal, beam search finds a better-scoring sequence than greedy when greedy's first choice is a trap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testutil  # noqa: F401  (fast-compiling XLA flags + the session compilation cache)

from vtfusion_jax import decoding, sharding
from vtfusion_jax.models.caption import CaptionModel

V, T, PAD, BOS, EOS = 11, 8, 0, 1, 2
SPEC = dict(
    width=16,
    dtype="float32",
    image_encoder=dict(name="cnn", channels=(4, 8), strides=(2, 2), norm="group", pos_emb="learn"),
    head=dict(name="caption_decoder", num_layers=2, num_heads=2, mlp_dim=32, max_len=T),
)


@pytest.fixture(scope="module")
def model_and_params():
    model = CaptionModel(SPEC, V)
    batch = {"image": jnp.zeros((1, 16, 16, 3)), "caption_in": jnp.zeros((1, T), jnp.int32)}
    params = sharding.unbox(jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, batch)["params"])
    # larger output weights: peaky, image-dependent distributions make the comparisons meaningful
    params["head"]["logits"]["kernel"] = params["head"]["logits"]["kernel"] * 8.0
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
    return model, params, images


def _decode(model, params, images, **kw):
    fn = jax.jit(
        lambda p, x: decoding.decode_captions(model, p, x, max_len=T - 1, bos_id=BOS, eos_id=EOS, pad_id=PAD, **kw)
    )
    return jax.device_get(fn(params, images))


def _forward(model, params, images, caption_in):
    fn = jax.jit(lambda p, x, c: model.apply({"params": p}, {"image": x, "caption_in": c})["logits"])
    return fn(params, images, caption_in)


@pytest.mark.parametrize("method,beam", [("greedy", 1), ("beam", 3)])
def test_kv_cache_matches_uncached(model_and_params, method, beam):
    model, params, images = model_and_params
    a = _decode(model, params, images, method=method, beam_size=beam, use_cache=True)
    b = _decode(model, params, images, method=method, beam_size=beam, use_cache=False)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a["length"], b["length"])


def test_beam_one_is_greedy(model_and_params):
    model, params, images = model_and_params
    g = _decode(model, params, images, method="greedy")
    b = _decode(model, params, images, method="beam", beam_size=1, length_penalty=0.0)
    np.testing.assert_array_equal(g["tokens"], b["tokens"])
    np.testing.assert_allclose(g["logprob"], b["logprob"], rtol=1e-6)
    # the decoded log-probability is the teacher-forced one of the same tokens
    toks = g["tokens"]
    cap_in = np.concatenate([np.full((3, 1), BOS), toks[:, :-1]], 1)
    logits = _forward(model, params, images, jnp.asarray(cap_in))
    logp = np.asarray(jax.nn.log_softmax(logits))
    steps = g["length"]
    tf = [logp[i, np.arange(steps[i]), toks[i, : steps[i]]].sum() for i in range(3)]
    np.testing.assert_allclose(g["logprob"], tf, rtol=1e-4, atol=1e-4)


def test_teacher_forcing_is_causal(model_and_params):
    model, params, images = model_and_params
    x = jax.random.randint(jax.random.PRNGKey(2), (3, T), 3, V)
    y = x.at[:, 5:].set(4)
    la, lb = _forward(model, params, images, x), _forward(model, params, images, y)
    np.testing.assert_allclose(la[:, :5], lb[:, :5], atol=1e-6)
    assert not np.allclose(la[:, 5:], lb[:, 5:])


def test_beam_search_beats_greedy_trap():
    # A toy step function (no model): greedy takes token 3 (p=.6) then is forced into a bad continuation;
    # token 4 (p=.4) leads to EOS with p=1. Beam 2 must find 4, EOS (logprob log .4 > log .6 + log .1).
    def step(seq, t, state):
        prev = jax.lax.dynamic_index_in_dim(seq, t, axis=1, keepdims=False)
        first = jnp.log(jnp.array([1e-9, 1e-9, 1e-9, 0.6, 0.4]))
        after3 = jnp.log(jnp.array([1e-9, 1e-9, 0.1, 0.45, 0.45]))
        after4 = jnp.log(jnp.array([1e-9, 1e-9, 1.0, 1e-9, 1e-9]))
        rows = jnp.where((prev == 3)[:, None], after3, jnp.where((prev == 4)[:, None], after4, first))
        return rows, state

    g_tok, g_lp, _ = decoding.greedy_search(step, None, 1, 2, BOS, EOS, PAD)
    b_tok, _, b_lp, b_len = decoding.beam_search(step, None, 1, 2, 2, BOS, EOS, PAD, length_penalty=0.0)
    assert list(np.asarray(b_tok[0])) == [4, EOS] and int(b_len[0]) == 2
    assert float(b_lp[0]) == pytest.approx(np.log(0.4), abs=1e-5)
    assert float(b_lp[0]) > float(g_lp[0])
