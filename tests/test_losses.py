"""The classification loss of the train step: cross-entropy, label smoothing, focal loss and padded rows."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vtfusion_jax import losses


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=7)
    valid = np.array([1, 1, 1, 0, 1, 1, 0], bool)
    return logits, labels, valid


def test_gamma_zero_is_masked_cross_entropy(batch):
    logits, labels, valid = batch
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    per = -_np_log_softmax(logits.astype(np.float64))[np.arange(7), labels]
    np.testing.assert_allclose(got, per[valid].mean(), rtol=1e-6)


def test_label_smoothing_matches_optax(batch):
    logits, labels, valid = batch
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid), label_smoothing=0.2)
    target = optax.smooth_labels(jax.nn.one_hot(labels, 5), 0.2)
    per = np.asarray(optax.softmax_cross_entropy(jnp.asarray(logits), target))
    np.testing.assert_allclose(got, per[valid].mean(), rtol=1e-6)
    # Smoothing moves the loss: a wrong implementation that ignored it would equal plain CE.
    plain = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    assert abs(float(got) - float(plain)) > 1e-3


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_loss_matches_reference(batch, gamma):
    logits, labels, valid = batch
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid), focal_gamma=gamma)
    logp = _np_log_softmax(logits.astype(np.float64))[np.arange(7), labels]
    per = -((1 - np.exp(logp)) ** gamma) * logp  # Lin et al. 2017, eq. 5 with alpha = 1
    np.testing.assert_allclose(got, per[valid].mean(), rtol=1e-5)


def test_focal_loss_shifts_the_gradient_to_the_wrong_examples():
    """Two examples, one confidently right (p = 0.99), one wrong (p = 0.1): focal loss makes the wrong example's share
    of the gradient far larger than cross-entropy does, and leaves the wrong example's loss nearly unchanged."""
    logits = jnp.log(jnp.array([[0.99, 0.01], [0.9, 0.1]]))
    labels = jnp.array([0, 1])
    valid = jnp.ones(2, bool)

    def easy_over_wrong(gamma):
        g = jax.grad(lambda x: losses.cross_entropy(x, labels, valid, focal_gamma=gamma))(logits)
        norms = jnp.linalg.norm(g, axis=-1)
        return float(norms[0] / norms[1])

    assert easy_over_wrong(0.0) == pytest.approx(0.01 / 0.9, rel=1e-4)  # CE: dL/dlogits = p - y
    assert easy_over_wrong(2.0) < easy_over_wrong(0.0) / 100  # the right example's pull all but vanishes
    per_wrong = (
        lambda gamma: float(  # noqa: E731
            losses.cross_entropy(logits[1:], labels[1:], valid[1:], focal_gamma=gamma)
        )
    )
    assert per_wrong(2.0) == pytest.approx(0.81 * per_wrong(0.0), rel=1e-5)  # (1 - 0.1)^2
    assert float(losses.cross_entropy(logits[:1], labels[:1], valid[:1], focal_gamma=2.0)) == pytest.approx(
        1e-4 * np.log(1 / 0.99), rel=1e-3
    )


def test_all_rows_padded_gives_zero_not_nan(batch):
    logits, labels, _ = batch
    for gamma in (0.0, 2.0):
        got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(7, bool), focal_gamma=gamma)
        assert float(got) == 0.0
