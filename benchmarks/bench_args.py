"""The command line the CPU benchmarks share: ``--config=FILE[:ARG]``, ``--out``, ``--wait_quiet`` and any number of
``--config.KEY=VALUE`` overrides. Stdlib only: benchmarks/profile_step.py parses its flags before jax is imported
(it pins the process to one core first)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the shared flags; a benchmark adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/perf.py", help="config file[:arg] (default configs/perf.py)")
    p.add_argument("--out", default="", help="also write the JSON result here")
    p.add_argument("--wait_quiet", type=float, default=0.0, help="wait up to this many s for 1-min load <= 1.5")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parsed flags and the config overrides as 'KEY=VALUE' strings; any other unknown argument is an error."""
    args, rest = p.parse_known_args(list(argv))
    overrides = []
    for a in rest:
        if not a.startswith("--config."):
            p.error(f"unrecognised argument {a!r} (overrides are --config.KEY=VALUE)")
        overrides.append(a[len("--config.") :])
    return args, overrides


def prepare(args: argparse.Namespace) -> dict:
    """What every CPU benchmark does before it builds anything: keeps freed host memory for reuse, as train.py does
    (vtfusion_jax/host_memory.py; it must run before jax starts a backend), then waits up to ``--wait_quiet`` seconds
    for a quiet machine. Returns the two records every result carries: {"host_memory": ..., "quiet_wait": ...}.
    (Imported here, not at the top: this module stays stdlib-only for benchmarks that parse flags before jax.)"""
    from vtfusion_jax import host_memory, speed

    host_mem = host_memory.reuse_freed_memory_on_cpu()
    quiet = speed.wait_for_quiet(max_wait_s=args.wait_quiet) if args.wait_quiet > 0 else None
    return {"host_memory": host_mem, "quiet_wait": quiet}


def alternate(runners: dict[str, Callable[[], float]], rounds: int, pause_s: float, warmup: int) -> dict:
    """Times several steps side by side: ``warmup`` untimed calls of each, then ``rounds`` rounds in which each runner
    is called once, in an order rotated by one each round (no runner always runs after the same neighbour), after
    ``pause_s`` of idle. Each runner returns its own wall time in seconds. Returns {name: [seconds per round]}."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(pause_s)
            times[n].append(runners[n]())
    return times


def record(benchmark: str, command: str, cfg: dict, load_start) -> dict:
    """The fields every benchmark result starts with: what ran, when, where, under which load and config."""
    from vtfusion_jax import speed

    return {
        "benchmark": benchmark,
        "command": command,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": speed.host_info(),
        "loadavg_start": load_start,
        "loadavg_end": speed.loadavg(),
        "config": cfg,
    }
