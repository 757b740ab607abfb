"""Workdir checks run when training starts, so that problems surface in seconds rather than hours later.

``check_writable`` (the workdir can be created and written), ``check_compatible`` (a checkpoint of a different model
is refused, naming the differing state paths and config fields) and ``check_free_disk`` (room for one more checkpoint;
the probe ``FREE_BYTES`` is replaceable by tests). ``CorruptFileError``: what a damaged file the run reads raises.

Workdirs are ``etils.epath`` paths: a local folder or a URI such as ``gs://bucket/run`` (through gcsfs). An object
store has no append, no empty folders, no folder rename and no free-space query; ``append_text``, ``copy_tree`` and
``move`` below are the run's only file operations that differ between the two.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath


class WorkdirError(RuntimeError):
    """The workdir cannot be used for this run; the message says why and what to do."""


class CorruptFileError(ValueError):
    """A file the run reads is truncated or garbled; the one-line message names it and what to do."""


def first_line(e: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 300 characters), for one-line error reports."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def read_json(path: str, hint: str = "") -> Any:
    """The JSON content of ``path``; a truncated or garbled file raises CorruptFileError naming it (and ``hint``)."""
    try:
        return json.loads(epath.Path(path).read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; deep nesting
        raise CorruptFileError(f"{path} is not valid JSON ({first_line(e)}){hint}") from None


def is_local(path: str | os.PathLike) -> bool:
    """False for a URI (gs://, s3://): an object store."""
    return "://" not in os.fspath(path)


def absolute(path: str) -> str:
    """A local path made absolute; a URI unchanged."""
    return os.path.abspath(path) if is_local(path) else path


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends ``text`` to the file ``path``; on an object store (objects are immutable) the whole object is
    rewritten, which suits the small logs this is used for."""
    p = epath.Path(path)
    if is_local(path):
        with p.open("a") as f:
            f.write(text)
    else:
        p.write_text((p.read_text() if p.exists() else "") + text)


def _files(folder: epath.Path):
    # (epath refuses rglob's `**` on GCS, and its walk() drops the gs:// scheme)
    for p in folder.iterdir():
        yield from _files(p) if p.is_dir() else (p,)


def copy_tree(src: str | os.PathLike, dest: str | os.PathLike, last: str | None = None) -> None:
    """Copies the files under the folder ``src`` to ``dest`` (either may be on an object store), overwriting; files
    named ``last`` are written after the others (a marker that readers of ``dest`` wait for)."""
    src, dest = epath.Path(src), epath.Path(dest)
    for f in sorted(_files(src), key=lambda f: f.name == last):
        out = dest / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with f.open("rb") as r, out.open("wb") as w:
            shutil.copyfileobj(r, w, 16 << 20)


def move(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Moves the folder ``src`` to ``dest``; on an object store, object by object (copy, then delete)."""
    src, dest = epath.Path(src), epath.Path(dest)
    if is_local(src):
        dest.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dest)
    else:
        copy_tree(src, dest)
        src.rmtree()


def _disk_free(path: str) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing ancestor)."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


FREE_BYTES: Callable[[str], int] = _disk_free
# An Orbax checkpoint holds the arrays plus metadata; the slack covers the metadata and the data-iterator state.
CHECKPOINT_OVERHEAD = 1.1
CHECKPOINT_SLACK_BYTES = 16 << 20


def check_writable(workdir: str) -> None:
    """Creates ``workdir`` (and missing parents) and checks a file can be written there.

    Raises:
      WorkdirError: naming the path and the OS (or object store's) error.
    """
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir {workdir} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    probe = path / f".write_probe_{uuid.uuid4().hex}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def state_bytes(abstract_state: Any) -> int:
    """Bytes of all arrays of a (global) train state."""
    return int(
        sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))
    )


def check_free_disk(directory: str, abstract_state: Any) -> int:
    """Refuses to start when ``directory``'s file system cannot hold one more checkpoint of ``abstract_state``.

    Returns:
      The estimated bytes of one checkpoint (not checked on an object store: it has no free-space limit to query).

    Raises:
      WorkdirError: with the estimate and the free space.
    """
    need = int(state_bytes(abstract_state) * CHECKPOINT_OVERHEAD) + CHECKPOINT_SLACK_BYTES
    if not is_local(directory):
        return need
    free = int(FREE_BYTES(directory))
    if free < need:
        raise WorkdirError(
            f"not enough free disk for one checkpoint in {directory}: about {need / 2**20:.1f} MiB needed "
            f"(train state {state_bytes(abstract_state) / 2**20:.1f} MiB), {free / 2**20:.1f} MiB free"
        )
    return need


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """{"params/head/logits/kernel": leaf}: the same path whether the tree holds dataclasses and named tuples (the
    live state) or the dicts and lists Orbax's metadata has."""
    return {"/".join(_key(k) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(x.shape), str(np.dtype(x.dtype))) for k, x in leaves_by_path(tree).items()}


def _flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: dict, new: dict, prefix: str = "model") -> list[str]:
    """``"field: old -> new"`` for every field under ``prefix`` that differs (lists and tuples compare equal)."""
    a = _flat_config(json.loads(json.dumps(old.get(prefix, {}))))
    b = _flat_config(json.loads(json.dumps(new.get(prefix, {}))))
    return [
        f"{prefix}.{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def check_compatible(workdir: str, step: int, saved: Any, expected: Any, config_json: str) -> None:
    """Refuses to resume a checkpoint whose state differs in structure, shape or dtype from this config's.

    Args:
      workdir, step: the run folder (holds config.json) and the checkpoint step being resumed.
      saved: the checkpoint's state tree metadata (anything with .shape / .dtype leaves).
      expected, config_json: this config's abstract train state and JSON (``config.to_json_best_effort()``).

    Raises:
      WorkdirError: naming up to 8 differing state paths and the differing model config fields.
    """
    have, want = _flat(saved), _flat(expected)
    diffs = []
    for path in sorted(set(have) | set(want)):
        if have.get(path) != want.get(path):
            h = "absent" if path not in have else f"{have[path][1]}{list(have[path][0])}"
            w = "absent" if path not in want else f"{want[path][1]}{list(want[path][0])}"
            diffs.append(f"{path} (checkpoint {h}, this config {w})")
    if not diffs:
        return
    fields = []
    saved_config = epath.Path(workdir) / "config.json"
    if saved_config.exists():
        try:
            old = json.loads(saved_config.read_text())
            new = json.loads(config_json)
            fields = config_differences(old, new, "model") or config_differences(old, new, "optim")
        except (OSError, ValueError):
            fields = [f"(could not read {saved_config})"]
    shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
    why = ", ".join(fields) if fields else "no difference found in config.json (was it edited or lost?)"
    raise WorkdirError(
        f"workdir {workdir} holds a checkpoint (step {step}) of a different model: {len(diffs)} state arrays "
        f"differ: {shown}. Config fields that differ from {saved_config}: {why}. "
        f"Use a fresh --workdir, or the config the run was started with."
    )
