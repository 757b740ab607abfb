"""The command line the CPU benchmarks share: ``--config=FILE[:ARG]``, ``--out``, ``--wait_quiet`` and any number of
``--config.KEY=VALUE`` overrides. Stdlib only: benchmarks/profile_step.py parses its flags before jax is imported
(it pins the process to one core first)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


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
