"""Config helpers: ':' arguments of config files and a friendly check of --config.KEY=VALUE overrides."""

from __future__ import annotations

import difflib
import importlib.util
import os
import types
from collections.abc import Sequence


def parse_arg(arg: str | None, **defaults) -> types.SimpleNamespace:
    """Parses a config file's ':' argument "k1=v1,k2=v2" against ``defaults`` (values keep the defaults' types).

    Example: ``configs/sort_of_clevr.py:fusion=cross`` -> ``parse_arg("fusion=cross", fusion="co_attention")``.

    Raises:
      ValueError: an unknown key (listing the valid ones) or a malformed item.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} is not KEY=VALUE; valid keys: {sorted(defaults)}")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
        kind = type(defaults[key])
        values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return types.SimpleNamespace(**values)


def sibling(config_file: str, name: str) -> types.ModuleType:
    """The module ``name``.py beside ``config_file`` (configs load configs/common.py this way: config files are
    loaded by path, not as a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"_vtfusion_configs_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str):
    """The config of ``spec`` = ``path/to/config.py[:arg]`` (its ``get_config(arg)``), loaded from the file path."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_vtfusion_config_check", os.path.abspath(path))
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"error: cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def check_overrides(argv: Sequence[str], flag: str = "config") -> None:
    """Fails fast, in one line, on a ``--config.KEY=VALUE`` whose KEY the config lacks, naming the valid keys at
    that level and the closest matches (ml_collections would raise a bare KeyError traceback).

    Args:
      argv, flag: the command line (sys.argv) and the config flag's name.

    Raises:
      SystemExit: with the message, on an unknown key.
    """
    spec = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag}="):
            spec = a.split("=", 1)[1]
        elif a == f"--{flag}" and i + 1 < len(argv):
            spec = argv[i + 1]
    overrides = [a[len(flag) + 3 :].split("=", 1)[0] for a in argv if a.startswith(f"--{flag}.")]
    if spec is None or not overrides:
        return
    config = load_config(spec)
    for key in overrides:
        node, done = config, []
        for part in key.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(done) or "the top level"
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.4)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise SystemExit(
                    f"error: unknown config key {key!r} in --{flag}.{key}: {where} has no {part!r}.{hint} "
                    f"Valid keys at {where}: {', '.join(sorted(keys))}"
                )
            node, done = node[part], [*done, part]
