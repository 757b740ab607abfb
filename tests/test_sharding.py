"""sharding.py: meshes, the rules table, divisibility fallback, and identical training under every mesh."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_testutil import load_config, train_losses

from vtfusion_jax import optim, sharding, tasks, train_lib


def test_make_mesh_shapes():
    assert dict(sharding.make_mesh((-1, 1, 1)).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.make_mesh((1, 1, 1)).devices.size == 1  # a subset of the devices
    for bad in ((3, -1, 1), (-1, -1, 1), (16, 1, 1), (8, 1)):
        with pytest.raises(ValueError):
            sharding.make_mesh(bad)


def test_fit_spec_replicates_indivisible_dims():
    mesh = sharding.make_mesh((1, 2, 4))
    assert sharding.fit_spec(P(None, None, "fsdp", "tensor"), (3, 3, 3, 32), mesh) == P(None, None, None, "tensor")
    assert sharding.fit_spec(P("fsdp", "tensor"), (30521, 13), mesh) == P(None, None)
    assert sharding.fit_spec(P(("data", "fsdp")), (16, 5), mesh) == P(("data", "fsdp"), None)


def test_state_shardings_follow_the_rules_table():
    config = load_config("tiny")
    mesh = sharding.make_mesh((1, 2, 4))
    task = tasks.make_task(config, mesh)
    tx, _ = optim.make_optimizer(config.optim, 10)
    _, sh = train_lib.state_layout(task.model, task.init_batch(), tx, mesh)
    specs = {jax.tree_util.keystr(path): s.spec for path, s in jax.tree_util.tree_flatten_with_path(sh.params)[0]}

    def spec(*parts):  # the spec of the one parameter whose path contains all parts
        (hit,) = [v for k, v in specs.items() if all(f"['{p}']" in k for p in parts)]
        return hit

    assert spec("fusion", "cross_attn", "query", "kernel") == P("fsdp", "tensor", None)  # (embed, heads, kv)
    assert spec("fusion", "cross_attn", "out", "kernel") == P("tensor", None, "fsdp")  # (heads, kv, embed)
    assert spec("fusion", "mlp", "fc1", "kernel") == P("fsdp", "tensor")  # (embed, mlp)
    assert spec("image_encoder", "conv0", "kernel") == P(None, None, None, "tensor")  # 3 RGB channels: replicated
    assert spec("text_encoder", "word_embeddings", "embedding") == P(None, "fsdp")  # (vocab, embed)
    assert spec("head", "logits", "kernel") == P("tensor", None)  # 13 answers: vocab stays whole
    # Adam moments are laid out like their parameters; the step counters are replicated.
    flat = jax.tree_util.tree_flatten_with_path(sh.opt_state)[0]
    mu = [s for path, s in flat if "mu" in jax.tree_util.keystr(path) and "query" in jax.tree_util.keystr(path)]
    assert mu and all(s.spec in (P("fsdp", "tensor", None), P("tensor", None)) for s in mu)


def _mesh_losses(tmp_path, shape) -> list[float]:
    """train_and_evaluate on tiny.py on a mesh: the 4 training losses and the validation loss."""
    config = load_config(
        "tiny",
        mesh_shape=shape,
        train__num_steps=4,
        train__log_every_steps=1,
        train__eval_every_steps=0,
        train__checkpoint_every_steps=100,
        dataset__val_split="validation[:32]",
        train__eval_batch_size=32,
    )
    workdir = tmp_path / "x".join(map(str, shape))
    result = train_lib.train_and_evaluate(config, str(workdir))
    return [*(train_losses(str(workdir))[s] for s in range(1, 5)), result["val"]["loss"]]


@pytest.mark.parametrize(
    "shape", [(2, 2, 2), pytest.param((8, 1, 1), marks=pytest.mark.slow)], ids=lambda s: "x".join(map(str, s))
)
def test_every_mesh_trains_like_one_device(tmp_path, shape):
    """train_and_evaluate on tiny.py: data + FSDP + tensor parallel at once (and, in the slow tier, data parallel
    alone) == a single device.

    (2, 2, 2) shards the batch over data x fsdp, the parameters over fsdp and the heads / MLP over tensor in one
    run: every code path that (2, 4, 1) and (1, 2, 4) took separately, at one compilation instead of two."""
    reference = np.array(_mesh_losses(tmp_path, (1, 1, 1)))
    assert np.all(np.isfinite(reference)) and reference[0] != reference[3]
    got = _mesh_losses(tmp_path, shape)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5, err_msg=f"mesh {shape}")
