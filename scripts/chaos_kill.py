"""Chaos test: SIGKILL train.py at random moments (many of them mid-checkpoint-write), restart it each time, then let it
finish; the final parameters must be bit-identical to an uninterrupted run's.

  python scripts/chaos_kill.py --kills=10 [--seed=0] [--out=results/reliability/chaos_kill.json]

Kills alternate between ``save`` (the instant a ``<step>.orbax-checkpoint-tmp*`` folder appears) and ``random`` (a
uniform delay after start). Each next run must resume from the newest complete step present at its start, and none
may exit with an error; the parameters and per-step losses are compared with an uninterrupted run at the end.
tests/test_faults.py runs ``chaos`` with 2 kills. Exit code 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TMP_MARK = ".orbax-checkpoint-tmp"
# Long enough for many kills; a save every step (nearly always a write in flight) with retention on; no validation.
CHAOS_OVERRIDES = dict(train__num_steps=24, train__checkpoint_every_steps=1, train__keep_checkpoints=2)
CHAOS_OVERRIDES.update(train__eval_every_steps=-1, train__log_every_steps=1)


def chaos_env(cache_dir: str) -> dict:
    """Subprocess environment: CPU with 8 devices, a persistent compilation cache in ``cache_dir``."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=8"]), JAX_PLATFORMS="cpu")
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env | dict(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def load_tiny(data_dir: str, overrides: dict):
    """configs/tiny.py with ``data_dir`` and dotted-key ``overrides`` ("train__num_steps" style)."""
    from vtfusion_jax import config_lib

    config = config_lib.load_config(os.path.join(REPO, "configs", "tiny.py"))
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    config.update_from_flattened_dict({"dataset.data_dir": data_dir, **dotted})
    return config


def checkpoint_listing(workdir: str) -> tuple[list[int], list[str]]:
    """(complete steps as Orbax lists them, names of leftover temporary folders)."""
    from orbax.checkpoint._src.path import step as step_lib

    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return [], []
    tmp = sorted(n for n in os.listdir(folder) if TMP_MARK in n)
    return sorted(step_lib.checkpoint_steps(folder)), tmp


def _start(workdir: str, data_dir: str, env: dict, overrides: dict, log) -> subprocess.Popen:
    """train.py on configs/tiny.py in ``workdir``, its output into the open file ``log``."""
    flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in {"dataset__data_dir": data_dir, **overrides}.items()]
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, kind: str, workdir: str, rng: random.Random, span: float) -> bool:
    """Waits for the moment of ``kind`` and SIGKILLs. Returns False if the process ended first."""
    folder = os.path.join(workdir, "checkpoints")
    started = time.time()
    if kind == "random":
        deadline = started + rng.uniform(0.0, span)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
    elif kind == "save":
        while proc.poll() is None and time.time() - started < 300:
            if os.path.isdir(folder) and any(TMP_MARK in n for n in os.listdir(folder)):
                break
            time.sleep(0.001)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _final_params(config, workdir: str):
    import jax

    from vtfusion_jax import train_lib

    return jax.tree.leaves(jax.device_get(train_lib.restore(config, workdir, "latest")[1]))


def last_losses(workdir: str) -> dict[int, float]:
    """{step: train/loss}, the last row for each step (a resumed run logs again the steps after its checkpoint)."""
    from vtfusion_jax import metrics

    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def chaos(
    workdir: str,
    data_dir: str,
    config,
    env: dict,
    kills: int = 10,
    seed: int = 0,
    overrides: dict | None = None,
    reference: str | None = None,
    kinds: tuple[str, ...] = ("save", "random"),
) -> dict:
    """Runs the kill loop in ``workdir``/chaos (``data_dir``: the built easy_vqa TFDS folder; ``env``: chaos_env's)
    with ``kills`` SIGKILLs (moments seeded by ``seed``, cycling through ``kinds``) and compares with ``reference``,
    an uninterrupted run's workdir (None: trained here). ``config``: the tiny config with ``overrides`` (default
    CHAOS_OVERRIDES) applied, to restore both runs' parameters. Returns the report; ``report["ok"]`` when every check
    held, else ``report["failures"]`` lists them."""
    overrides = dict(CHAOS_OVERRIDES if overrides is None else overrides)
    rng = random.Random(seed)
    os.makedirs(workdir, exist_ok=True)
    report: dict = {"kills": [], "failures": []}
    t0 = time.time()
    if reference is None:
        reference = os.path.join(workdir, "reference")
        logged = os.path.join(reference, "metrics.jsonl")
        with open(os.path.join(workdir, "reference.log"), "w") as log:
            proc, first = _start(reference, data_dir, env, overrides, log), None
            while proc.poll() is None:
                if first is None and os.path.exists(logged) and os.path.getsize(logged):
                    first = time.time() - t0
                time.sleep(0.01)
        if proc.returncode != 0:
            raise RuntimeError(f"reference run failed; see {workdir}/reference.log")
        report["reference_seconds"] = time.time() - t0
        report["reference_startup_seconds"] = first or 0.0
    else:  # estimates for the random kill moments
        report["reference_seconds"], report["reference_startup_seconds"] = 20.0, 10.0
    startup, span = report["reference_startup_seconds"], report["reference_seconds"]
    per_step = max(span - startup, 0.1) / overrides["train__num_steps"]
    run_dir = os.path.join(workdir, "chaos")
    total = overrides["train__num_steps"]
    i = attempt = 0
    while i < kills and attempt < 4 * kills:
        attempt += 1
        kind = kinds[i % len(kinds)]
        before, _ = checkpoint_listing(run_dir)
        if before and before[-1] >= total:  # finished before enough kills: start over, keeping the kills done
            report["restarts_from_scratch"] = report.get("restarts_from_scratch", 0) + 1
            shutil.rmtree(run_dir)
            before = []
        log_path = os.path.join(workdir, f"run{attempt:02d}.log")
        t = time.time()
        with open(log_path, "w") as log:
            proc = _start(run_dir, data_dir, env, overrides, log)
            # A random moment before this run would end: startup plus the time of the steps still to do.
            left = total - (before[-1] if before else 0)
            killed = _kill_when(proc, kind, run_dir, rng, 0.9 * (startup + left * per_step))
        with open(log_path) as f:
            resumed = re.search(r"Resumed from step (\d+)", f.read())
        _, tmp = checkpoint_listing(run_dir)
        entry = {"kind": kind, "killed": killed, "seconds_alive": round(time.time() - t, 2), "tmp_folders_after": tmp}
        if resumed and int(resumed.group(1)) != (before[-1] if before else None):
            report["failures"].append(f"run {attempt}: resumed from {resumed.group(1)}, newest complete was {before}")
        if not killed and proc.returncode != 0:
            report["failures"].append(f"run {attempt} exited {proc.returncode} on its own; see {log_path}")
        report["kills"].append(entry)
        i += killed
    final_log = os.path.join(workdir, "final.log")
    with open(final_log, "w") as log:
        returncode = _start(run_dir, data_dir, env, overrides, log).wait()
    with open(final_log) as f:
        done = f"done at step {total}" in f.read()
    if returncode != 0 or not done:
        report["failures"].append(f"final run exited {returncode}; see {final_log}")
    else:
        a, b = last_losses(reference), last_losses(run_dir)
        if sorted(a) != sorted(b) or any(a[s] != b[s] for s in a):
            report["failures"].append(f"per-step losses differ: {a} vs {b}")
        pa, pb = _final_params(config, reference), _final_params(config, run_dir)
        same = len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))
        report["params_bit_identical"] = bool(same)
        if not same:
            report["failures"].append("final parameters differ from the uninterrupted run's")
    report["kills_survived"] = sum(k["killed"] for k in report["kills"])
    report["kills_mid_checkpoint_write"] = sum(k["killed"] and bool(k["tmp_folders_after"]) for k in report["kills"])
    return report | dict(wall_seconds=round(time.time() - t0, 1), ok=not report["failures"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--data_dir", default=None, help="TFDS folder (default: <workdir>/tfds, built once)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="chaos_kill_"))
    data_dir = os.path.abspath(args.data_dir or os.path.join(workdir, "tfds"))
    os.environ.update(chaos_env(os.path.join(workdir, "xla_cache")))
    config = load_tiny(data_dir, CHAOS_OVERRIDES)
    from vtfusion_jax import tasks

    tasks.make_task(config)  # build the dataset once, before any kill
    report = chaos(workdir, data_dir, config, dict(os.environ), kills=args.kills, seed=args.seed)
    report.update(seed=args.seed, command=" ".join(sys.argv))
    text = json.dumps(report, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "kills"}, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
