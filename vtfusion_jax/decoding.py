"""Autoregressive decoding: greedy and beam search over a step function, jit-compatible (lax.fori_loop).

``step_fn(seq, t, state) -> (logits [R, V], state)`` gives each row's next-token logits at position t from the
buffer ``seq`` [R, T_max] (BOS at 0, decoded tokens at 1..t) and a carried state (a KV cache, or nothing);
``cached_step`` (O(T) per step) and ``uncached_step`` (recomputes the prefix) build it from a CaptionModel.

Beam search (size K): beams keep their summed log-probabilities; a finished beam (EOS) continues with PAD at
log-probability 0 and competes with the live ones; the K best of K x V continuations survive each step. The result
maximises score / lp(length), lp = ((5 + length) / 6) ** length_penalty (GNMT; length includes EOS). K = 1 is greedy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _length_norm(scores, lengths, alpha: float):
    return scores / (((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha)


def greedy_search(step_fn: StepFn, state: Any, batch: int, max_len: int, bos_id: int, eos_id: int, pad_id: int):
    """Greedy decoding.

    Returns:
      (tokens int32 [B, max_len] (after BOS; PAD after EOS), log-probability sum float32 [B], lengths int32 [B]).
    """
    seq = jnp.full((batch, max_len + 1), pad_id, jnp.int32).at[:, 0].set(bos_id)

    def body(t, carry):
        seq, score, length, done, state = carry
        logits, state = step_fn(seq, t, state)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        score = score + jnp.where(done, 0.0, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0])
        length = length + (~done).astype(jnp.int32)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], t + 1, axis=1)
        return seq, score, length, done | (tok == eos_id), state

    init = (seq, jnp.zeros(batch), jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool), state)
    seq, score, length, _, _ = jax.lax.fori_loop(0, max_len, body, init)
    return seq[:, 1:], score, length


def _gather_beams(tree: Any, beam_idx: jax.Array, batch: int, beams: int) -> Any:
    """Rows [B * K, ...] reordered by beam_idx [B, K] (within each example)."""

    def take(x):
        x = x.reshape(batch, beams, *x.shape[1:])
        x = jnp.take_along_axis(x, beam_idx.reshape(batch, beams, *([1] * (x.ndim - 2))), axis=1)
        return x.reshape(batch * beams, *x.shape[2:])

    return jax.tree.map(take, tree)


def beam_search(
    step_fn: StepFn,
    state: Any,
    batch: int,
    beam_size: int,
    max_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 0.6,
):
    """Beam search; ``state`` and ``step_fn`` work on B * K rows (example b's beams at rows b*K .. b*K + K - 1).

    Returns:
      The best beam's (tokens int32 [B, max_len], normalised score, log-probability sum float32 [B], lengths [B]).
    """
    k = beam_size
    seq = jnp.full((batch, k, max_len + 1), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    # only beam 0 is alive at the start, so the first step does not pick K copies of one token
    scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None], (batch, 1))

    def body(t, carry):
        seq, scores, lengths, done, state = carry
        logits, state = step_fn(seq.reshape(batch * k, -1), t, state)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, -1)  # [B, K, V]
        v = logp.shape[-1]
        pad_only = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)
        logp = jnp.where(done[..., None], pad_only, logp)
        top, idx = jax.lax.top_k((scores[..., None] + logp).reshape(batch, k * v), k)  # [B, K]
        beam, tok = idx // v, (idx % v).astype(jnp.int32)
        seq = jnp.take_along_axis(seq, beam[..., None], axis=1)
        was_done = jnp.take_along_axis(done, beam, axis=1)
        lengths = jnp.take_along_axis(lengths, beam, axis=1) + (~was_done).astype(jnp.int32)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[..., None], t + 1, axis=2)
        state = _gather_beams(state, beam, batch, k)
        return seq, top, lengths, was_done | (tok == eos_id), state

    init = (seq, scores, jnp.zeros((batch, k), jnp.int32), jnp.zeros((batch, k), bool), state)
    seq, scores, lengths, _, _ = jax.lax.fori_loop(0, max_len, body, init)
    norm = _length_norm(scores, lengths, length_penalty)
    best = jnp.argmax(norm, axis=1)[:, None]  # [B, 1]
    pick = lambda x: jnp.take_along_axis(x, best, axis=1)[:, 0]  # noqa: E731
    tokens = jnp.take_along_axis(seq, best[..., None], axis=1)[:, 0, 1:]
    return tokens, pick(norm), pick(scores), pick(lengths)


def _decoder(name: str) -> Callable:
    """A CaptionModel method for ``model.apply``: its decoder's (``head``) method ``name``."""
    return lambda model, *args: getattr(model.head, name)(*args)


def cached_step(model, params, cross, image_mask) -> tuple[StepFn, Any]:
    """(step_fn, initial cache) decoding a CaptionModel with its key/value cache."""
    cache = model.apply({"params": params}, image_mask.shape[0], method=_decoder("init_cache"))

    def step(seq, t, cache):
        token = jax.lax.dynamic_index_in_dim(seq, t, axis=1, keepdims=False)
        return model.apply({"params": params}, token, t, cache, cross, image_mask, method=_decoder("decode_step"))

    return step, cache


def uncached_step(model, params, cross, image_mask) -> tuple[StepFn, Any]:
    """(step_fn, None) recomputing the whole prefix at every step (the reference for the cache)."""

    def step(seq, t, state):
        logits = model.apply({"params": params}, seq[:, :-1], t, cross, image_mask, method=_decoder("decode_full"))
        return logits, state

    return step, None


def decode_captions(
    model,
    params,
    image: jax.Array,
    *,
    method: str,
    max_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int = 1,
    length_penalty: float = 0.6,
    use_cache: bool = True,
) -> dict:
    """Captions for images [B, H, W, 3] (normalised). Jit this (static: everything but params and image).

    Returns:
      {"tokens" [B, max_len], "score" [B] (normalised for beam, log-prob for greedy), "logprob" [B], "length" [B]}.
    """
    if max_len > model.model_config["head"]["max_len"]:
        raise ValueError(f"max_len {max_len} exceeds the decoder's max_len {model.model_config['head']['max_len']}")
    tokens, mask = model.apply({"params": params}, image, method=type(model).encode_memory)  # [B, M, Dm], [B, M]
    b = tokens.shape[0]
    rows = beam_size if method == "beam" else 1
    if rows > 1:
        tokens, mask = jnp.repeat(tokens, rows, axis=0), jnp.repeat(mask, rows, axis=0)
    cross = model.apply({"params": params}, tokens, method=_decoder("prepare"))
    make = cached_step if use_cache else uncached_step
    step, state = make(model, params, cross, mask)
    if method == "greedy":
        toks, logprob, length = greedy_search(step, state, b, max_len, bos_id, eos_id, pad_id)
        return {"tokens": toks, "score": logprob, "logprob": logprob, "length": length}
    if method == "beam":
        toks, score, logprob, length = beam_search(
            step, state, b, beam_size, max_len, bos_id, eos_id, pad_id, length_penalty
        )
        return {"tokens": toks, "score": score, "logprob": logprob, "length": length}
    raise ValueError(f"unknown decoding method {method!r}; valid: ['beam', 'greedy']")
