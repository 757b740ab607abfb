"""Multi-process training (`pytest -m faults`): 2 processes x 4 CPU devices, coordinated by jax.distributed on
127.0.0.1, compute what 1 process x 8 devices computes; checkpoints move between the two layouts; only process 0
writes logs and metrics."""

import glob
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from train_testutil import REPO, config_flags, load_config, read_jsonl, subprocess_env, train_losses

from vtfusion_jax import train_lib

pytestmark = pytest.mark.faults

OVERRIDES = dict(
    train__num_steps=12,
    train__steps_per_run=10,  # the first run of each layout stops (with a checkpoint) at step 10
    train__log_every_steps=1,
    train__eval_every_steps=-1,
    train__checkpoint_every_steps=100,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """train.py on tiny as 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1)."""
    port, procs = _free_port(), []
    for pid in range(2):
        env = subprocess_env()
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env.update(
            XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=4"]),
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/tiny.py", f"--workdir={workdir}"]
        procs.append(
            subprocess.Popen(
                [*cmd, *config_flags(**OVERRIDES)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_processes_match_one_and_checkpoints_move_between_layouts(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    config = load_config("tiny", **OVERRIDES)
    # 1 process x 8 devices (in-process; also builds the dataset before two processes read it).
    assert train_lib.train_and_evaluate(config, str(one))["step"] == 10
    # 2 processes x 4 devices.
    runs = run_two_processes(two)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped (train.steps_per_run) at step 10" in runs[0].stdout
    a, b = train_losses(str(one)), train_losses(str(two))
    assert sorted(a) == sorted(b) == list(range(1, 11))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=0, atol=1e-6)
    # Only process 0 wrote logs and metrics: one events file, one metrics row per step.
    assert len(glob.glob(str(two / "events.out.tfevents.*"))) == 1
    assert [r["step"] for r in read_jsonl(str(two / "metrics.jsonl"))] == list(range(1, 11))

    # Swap: the 2-process checkpoint continues in 1 process, the 1-process checkpoint in 2 processes.
    assert train_lib.train_and_evaluate(config, str(two))["step"] == 12
    runs = run_two_processes(one)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from step 10" in runs[0].stderr and "done at step 12" in runs[0].stdout
    a, b = train_losses(str(one)), train_losses(str(two))
    np.testing.assert_allclose([b[s] for s in (11, 12)], [a[s] for s in (11, 12)], rtol=0, atol=1e-6)
    assert len(glob.glob(str(one / "events.out.tfevents.*"))) == 2  # the 1-process run's + process 0's
