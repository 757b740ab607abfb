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
