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

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # 2 processes x 4 devices: ~75 s

N, K, M = 6, 2, 4  # one chained run: steps 1..K in 1 process, K+1..M in 2 processes, M+1..N in 1 process again
OVERRIDES = dict(
    train__num_steps=N,
    train__log_every_steps=1,
    train__eval_every_steps=-1,
    train__checkpoint_every_steps=100,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, timeout: float = 300, **overrides) -> list[subprocess.CompletedProcess]:
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
                [*cmd, *config_flags(**OVERRIDES, **overrides)],
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
    """One run moves 1 process -> 2 processes -> 1 process (both checkpoint moves, one 2-process launch: each launch
    costs two interpreter start-ups and compilations); every step's loss equals an uninterrupted 1-process run's."""
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    # 1 process x 8 devices, uninterrupted (in-process; also builds the dataset before two processes read it).
    assert train_lib.train_and_evaluate(load_config("tiny", **OVERRIDES), str(straight))["step"] == N
    # Steps 1..K: 1 process x 8 devices.
    first = train_lib.train_and_evaluate(load_config("tiny", train__steps_per_run=K, **OVERRIDES), str(chain))
    assert first["step"] == K and first["stopped_for_run_limit"]
    # Steps K+1..M: 2 processes x 4 devices continue the 1-process checkpoint.
    runs = run_two_processes(chain, train__steps_per_run=M - K)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resumed from step {K}" in runs[0].stderr and f"stopped (train.steps_per_run) at step {M}" in runs[0].stdout
    # Steps M+1..N: the 2-process checkpoint continues in 1 process.
    assert train_lib.train_and_evaluate(load_config("tiny", **OVERRIDES), str(chain))["step"] == N

    a, b = train_losses(str(straight)), train_losses(str(chain))
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    assert a[K + 1] != a[M]  # the 2-process steps trained (the comparison below is not of constants)
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=0, atol=1e-6)
    # Only process 0 wrote logs and metrics: one events file per run (1 process, process 0, 1 process) and one
    # metrics row per step (a row from process 1 would repeat a step).
    assert len(glob.glob(str(chain / "events.out.tfevents.*"))) == 3
    assert [r["step"] for r in read_jsonl(str(chain / "metrics.jsonl"))] == list(range(1, N + 1))
