"""Measures the figures of the README's "Reliability" section and writes results/reliability/figures.json.

  python scripts/reliability_figures.py [--kills=10] [--only=chaos,bad_input,multiprocess,sigterm] [--readme]

Writes results/reliability/figures.json (parts not run keep their previous values) and the README block
<!-- BEGIN generated:reliability --> (--readme: only the block, from the JSON).

Parts (each also checked by a test, see README):
  chaos        scripts/chaos_kill.py's loop: SIGKILLs survived, how many hit a checkpoint write, bit-identical params.
  bad_input    trials per bad-input class through the manifest decoder / tokenizer, with their outcomes.
  multiprocess 2 processes x 4 CPU devices vs 1 process x 8 devices, 10 tiny steps: max |loss difference|.
  sigterm      seconds from SIGTERM to a clean exit 0 (checkpoint saved), train.py on tiny.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _chaos_module():
    spec = importlib.util.spec_from_file_location("chaos_kill", os.path.join(REPO, "scripts", "chaos_kill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHAOS = _chaos_module()


def _losses(workdir: str) -> dict[int, float]:
    return CHAOS.last_losses(workdir)


def _train(workdir, data_dir, env, overrides, extra_env=None, wait=True):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/tiny.py", f"--workdir={workdir}"]
    return subprocess.Popen(
        [*cmd, *CHAOS.flag_list(data_dir, overrides)],
        cwd=REPO,
        env=dict(env, **(extra_env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def measure_chaos(root, data_dir, env, kills):
    config = CHAOS.load_tiny(data_dir, dict(CHAOS.CHAOS_OVERRIDES, mesh_shape=(-1, 1, 1)))
    report = CHAOS.chaos(os.path.join(root, "chaos"), data_dir, config, kills=kills, seed=0, env=env)
    keep = ("kills_survived", "kills_mid_checkpoint_write", "resumed_from_a_checkpoint", "params_bit_identical")
    out = {k: report.get(k) for k in (*keep, "failures", "wall_seconds")}
    out["kill_kinds"] = dict(collections.Counter(k["kind"] for k in report["kills"] if k["killed"]))
    out["command"] = f"python scripts/chaos_kill.py --kills={kills}"
    return out


def measure_bad_input(trials: int = 50):
    import numpy as np
    from PIL import Image

    from vtfusion_jax.data import manifest
    from vtfusion_jax.data.tokenizer import Tokenizer

    rng = np.random.default_rng(0)

    def outcome(data: bytes, reference=None) -> str:
        try:
            img = np.asarray(manifest.decode_image(io.BytesIO(data)))
        except Exception as e:  # noqa: BLE001
            return f"refused ({type(e).__name__})"
        if reference is None:
            return "decoded"
        return "decoded, identical to the full file" if np.array_equal(img, reference) else "decoded, DIFFERENT"

    def encoded(fmt, mode="RGB"):
        img = Image.fromarray(rng.integers(0, 255, (16, 24, 3), np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, fmt)
        return buf.getvalue()

    test_mod = _test_module()
    classes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for _ in range(trials):
        classes["random bytes"][outcome(rng.bytes(int(rng.integers(0, 4096))))] += 1
        for fmt in ("PNG", "JPEG"):
            full = encoded(fmt)
            whole = np.asarray(manifest.decode_image(io.BytesIO(full)))
            cut = full[: int(len(full) * rng.uniform(0, 0.999))]
            classes[f"truncated {fmt}"][outcome(cut, whole)] += 1
        value = int(rng.integers(0, 65536))
        buf = io.BytesIO()
        Image.fromarray(np.full((3, 5), value, np.uint16)).save(buf, "PNG")
        ok = (np.asarray(manifest.decode_image(io.BytesIO(buf.getvalue()))) == round(value / 257)).all()
        classes["16-bit PNG"]["decoded, scaled to 8 bits" if ok else "decoded, WRONG"] += 1
        cmyk = encoded("JPEG", "CMYK")
        classes["CMYK JPEG"][outcome(cmyk)] += 1
    classes["0 x 0 PNG"][outcome(test_mod.png_header_only(0, 0))] += 1
    classes["20000 x 20000 PNG"][outcome(test_mod.png_header_only(20000, 20000))] += 1
    tok = Tokenizer(max_len=16)
    texts = {
        "empty text": [""],
        "whitespace text": [" \t\n "],
        "100,000-character text": ["what colour is the shape " * 4000],
        "invalid UTF-8 text": [bytes(rng.integers(128, 256, 20, dtype=np.uint8)) for _ in range(trials)]
        + [b"what \xff colour".decode("utf-8", "surrogateescape")],
    }
    for name, items in texts.items():
        for t in items:
            try:
                ids = tok.encode(t)
                ok = ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) <= tok.max_len
                classes[name][f"tokenized, {len(ids)} tokens" if ok else "WRONG"] += 1
            except Exception as e:  # noqa: BLE001
                classes[name][f"error ({type(e).__name__})"] += 1
    notes = {
        "empty text": "manifest: bad row; predict.py: one-line error, exit 2; tokenizer: [CLS][SEP]",
        "whitespace text": "manifest: bad row; predict.py: one-line error, exit 2; tokenizer: [CLS][SEP]",
        "0 x 0 PNG": "manifest: bad row; predict.py: one-line error",
        "20000 x 20000 PNG": "refused from the header, no pixel decoded",
        "invalid UTF-8 text": "tokenizer: bytes decoded with replacement, U+FFFD dropped; manifest: bad line",
        "unseen label": "manifest (validation / test): kept with label -1, counted wrong by eval (num_unseen_label)",
    }
    return {
        "classes": {k: dict(v) for k, v in classes.items()},
        "trials_per_random_class": trials,
        "notes": notes,
        "command": "python scripts/reliability_figures.py --only=bad_input; tests: pytest -q tests/test_bad_input.py",
    }


def _test_module():
    spec = importlib.util.spec_from_file_location("bad_input", os.path.join(REPO, "tests", "test_bad_input.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    spec.loader.exec_module(module)
    return module


def measure_multiprocess(root, data_dir, env):
    overrides = dict(
        train__num_steps=10, train__log_every_steps=1, train__eval_every_steps=-1, train__checkpoint_every_steps=100
    )
    one, two = os.path.join(root, "mp_one"), os.path.join(root, "mp_two")
    p = _train(one, data_dir, env, overrides)
    _, err = p.communicate()
    assert p.returncode == 0, err[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    four = " ".join(
        [f for f in env["XLA_FLAGS"].split() if "device_count" not in f] + ["--xla_force_host_platform_device_count=4"]
    )
    started = time.time()
    procs = [
        _train(
            two,
            data_dir,
            env,
            overrides,
            dict(
                XLA_FLAGS=four,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    a, b = _losses(one), _losses(two)
    diff = max(abs(a[s] - b[s]) for s in a)
    return {
        "steps": sorted(a),
        "max_abs_loss_difference": diff,
        "two_process_wall_seconds": round(time.time() - started, 1),
        "command": "pytest -q tests/test_multiprocess.py",
    }


def measure_sigterm(root, data_dir, env, repeats=3):
    overrides = dict(
        train__num_steps=100000,
        train__log_every_steps=1,
        train__eval_every_steps=-1,
        train__checkpoint_every_steps=100000,
    )
    times = []
    for i in range(repeats):
        workdir = os.path.join(root, f"sigterm{i}")
        p = _train(workdir, data_dir, env, overrides)
        metrics = os.path.join(workdir, "metrics.jsonl")
        while p.poll() is None and not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 3):
            time.sleep(0.05)
        sent = time.time()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate()
        times.append(round(time.time() - sent, 2))
        assert p.returncode == 0 and re.search(r"preempted at step \d+", out), err[-2000:]
    return {
        "seconds_to_clean_exit": times,
        "max_seconds": max(times),
        "limit_seconds": 30,
        "command": "pytest -q tests/test_train_failures.py -k sigterm",
    }


def readme_block(f: dict) -> str:
    """The README's generated:reliability block from figures.json."""
    lines = [
        f"Measured by `{f['command']}` on {f['measured']} ({f['machine']}); output in "
        "`results/reliability/figures.json`.",
        "",
        "| Figure | Value | Command |",
        "|---|---|---|",
    ]
    if c := f.get("chaos"):
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(c["kill_kinds"].items()))
        lines.append(
            f"| SIGKILLs survived | **{c['kills_survived']}** ({kinds}; {c['kills_mid_checkpoint_write']} left a "
            f"half-written checkpoint behind), final params bit-identical: {c['params_bit_identical']}, "
            f"failures: {len(c['failures'])} | `{c['command']}` |"
        )
    if m := f.get("multiprocess"):
        lines.append(
            f"| 2 processes x 4 devices vs 1 x 8, {len(m['steps'])} tiny steps | max loss difference "
            f"**{m['max_abs_loss_difference']:.1e}** | `{m['command']}` |"
        )
    if t := f.get("sigterm"):
        times = ", ".join(f"{x:.1f}" for x in t["seconds_to_clean_exit"])
        lines.append(
            f"| SIGTERM to a clean exit 0 (checkpoint saved) | **{t['max_seconds']:.1f} s** at most ({times} s; "
            f"limit {t['limit_seconds']} s) | `{t['command']}` |"
        )
    if b := f.get("bad_input"):
        for name, outcomes in b["classes"].items():
            text = "; ".join(f"{n} x {o}" for o, n in sorted(outcomes.items(), key=lambda x: -x[1]))
            if name in b.get("notes", {}):
                text += f" ({b['notes'][name]})"
            n = sum(outcomes.values())
            lines.append(
                f"| bad input: {name} ({n} trial{'s' * (n > 1)}) | {text} | `pytest tests/test_bad_input.py` |"
            )
    return "\n".join(lines)


def update_readme(figures: dict, path: str = os.path.join(REPO, "README.md")) -> None:
    with open(path) as f:
        text = f.read()
    begin, end = "<!-- BEGIN generated:reliability -->", "<!-- END generated:reliability -->"
    new = re.sub(
        re.escape(begin) + ".*?" + re.escape(end),
        lambda _: f"{begin}\n{readme_block(figures)}\n{end}",
        text,
        flags=re.S,
    )
    with open(path, "w") as f:
        f.write(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--only", default="chaos,bad_input,multiprocess,sigterm")
    parser.add_argument("--out", default=os.path.join(REPO, "results", "reliability", "figures.json"))
    parser.add_argument("--readme", action="store_true", help="only rewrite README.md's block from --out")
    args = parser.parse_args()
    if args.readme:
        with open(args.out) as f:
            update_readme(json.load(f))
        return 0
    root = tempfile.mkdtemp(prefix="reliability_")
    data_dir = os.path.join(root, "tfds")
    env = CHAOS.chaos_env(os.path.join(root, "xla_cache"), 8)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"  # tiny programs: compile time dominates
    os.environ.update(env)
    from vtfusion_jax import train_lib

    train_lib.get_meta(CHAOS.load_tiny(data_dir, {}))  # build the dataset once
    figures = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            figures = json.load(f)
    parts = args.only.split(",")
    t0 = time.time()
    if "bad_input" in parts:
        figures["bad_input"] = measure_bad_input()
    if "sigterm" in parts:
        figures["sigterm"] = measure_sigterm(root, data_dir, env)
    if "multiprocess" in parts:
        figures["multiprocess"] = measure_multiprocess(root, data_dir, env)
    if "chaos" in parts:
        figures["chaos"] = measure_chaos(root, data_dir, env, args.kills)
    load = os.getloadavg()
    figures["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; 1-min load average {load[0]:.1f} at the "
        f"end (shared with other jobs: timings are upper bounds)"
    )
    figures["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    figures["command"] = "python scripts/reliability_figures.py"
    figures["wall_seconds_last_run"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(figures, indent=1, sort_keys=True))
    update_readme(figures)
    return 0 if not figures.get("chaos", {}).get("failures") else 1


if __name__ == "__main__":
    sys.exit(main())
