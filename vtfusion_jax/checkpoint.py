"""Checkpoints: the only module that touches Orbax.

Layout: ``workdir/checkpoints/<step>/{state, data}`` (TrainState, every process writing its shards; the data
iterator's JSON state); saves are asynchronous. A step folder is complete or absent even under SIGKILL (Orbax renames
``s.orbax-checkpoint-tmp*`` to ``s`` when done; old steps are renamed into ``_deleted/`` before removal). Retention:
the newest ``keep`` plus the best by the validation metric (steps saved without one count only as "newest").
The data item also holds a checksum of the state's arrays (``digest``): a flipped bit that the storage format does not
detect (zstd keeps incompressible blocks raw and unchecked) fails the restore instead of changing the model.
Restore falls back: a step that fails to read is moved into ``_corrupt/`` (never deleted) and the next one is tried.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from vtfusion_jax.preflight import absolute, first_line, leaves_by_path, move, read_json

log = logging.getLogger(__name__)

STATE, DATA = "state", "data"
TRASH = "_deleted"  # old steps are renamed here, then removed (see the module docstring)
CORRUPT = "_corrupt"  # steps that fail to read are moved here, never deleted
DIGEST = "_state_digest"  # key of the state's checksum in the data item (absent in older checkpoints)


class UnreadableStepError(ValueError):
    """A checkpoint step failed to read on some process (the message: the error's first line)."""


class Checkpointer:
    """Wraps an Orbax CheckpointManager for train states + data-iterator state."""

    def __init__(self, directory: str, *, keep: int = 2, best_metric: str | None = None, best_mode: str = "max",
                 asynchronous: bool = True, read_only: bool = False):  # fmt: skip
        """Opens (or creates) a checkpoint folder.

        Args:
          directory: folder holding one sub-folder per step.
          keep: number of newest checkpoints kept.
          best_metric, best_mode: the ``save`` metric that keeps the best checkpoint (None: newest only), "max"/"min".
          asynchronous: write in a background thread.
          read_only: never write or delete (evaluation); an unreadable step is still moved aside.
        """
        self.directory = absolute(directory)
        self.best_metric = best_metric
        policies = [ocm.LatestN(n=max(1, int(keep)))]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda m: float(m[best_metric])  # noqa: E731
            kw = dict(reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False)
            policies.append(ocm.BestN(get_metric_fn=best_fn, **kw))
        writes = dict(create=not read_only, cleanup_tmp_directories=not read_only)
        writes.update(todelete_subdir=None if read_only else TRASH, read_only=read_only)
        writes.update(preservation_policy=None if read_only else ocm.AnyPreservationPolicy(policies))
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn, best_mode=best_mode, enable_async_checkpointing=asynchronous, **writes
        )
        self._read_only = read_only
        for step, why in _bad_metrics(self.directory, best_fn):  # Orbax reads every step's metrics when it opens
            self._set_aside(step, why)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))
        self._empty_trash()

    def _empty_trash(self) -> None:
        """Removes steps that retention renamed into ``TRASH`` (process 0; entries one by one, since Orbax may be
        renaming another one in concurrently). On an object store Orbax deletes old steps directly: no trash."""
        trash = os.path.join(self.directory, TRASH)
        if self._read_only or jax.process_index() != 0 or not os.path.isdir(trash):
            return
        for name in os.listdir(trash):
            shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Checkpoint with the best ``best_metric`` (the newest when no metric was recorded), or None."""
        return self._manager.best_step()

    def metrics(self, step: int) -> Mapping[str, Any] | None:
        """Metrics saved with ``step`` (None if there were none)."""
        return self._manager.metrics(step)

    def save(
        self, step: int, state: Any, data_state: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> bool:
        """Starts saving ``state`` (global jax.Arrays) and the JSON-able ``data_state`` as ``step``, with validation
        ``metrics`` or None (returns at once when asynchronous). False if ``step`` already exists (nothing written)."""
        if step in self._manager.all_steps():
            return False
        data = dict(data_state, **{DIGEST: digest(state)})
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data)})
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._empty_trash()
        return self._manager.save(int(step), args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state`` (ShapeDtypeStructs with
        ``sharding`` set, or arrays). Returns (state, data_state); raises UnreadableStepError on a checksum mismatch."""
        return _verified(*self._read(step, abstract_state))

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        abstract = jax.tree.map(_abstract, abstract_state)
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract), DATA: ocp.args.JsonRestore()})
        out = self._manager.restore(int(step), args=args)
        return out[STATE], dict(out[DATA] or {})

    def restore_readable(
        self, abstract_state: Any, which: str | int | None = "latest", check: Callable | None = None
    ) -> tuple[int, Any, dict] | None:
        """Restores the newest step that reads: ``which`` "latest", "best" (also None: the best step first, then
        the newest) or a step number (that step only).

        A step that fails to read (any error reading its metadata, arrays or data state, or a checksum mismatch) is
        moved into ``CORRUPT`` by process 0, with one log line naming it and the error's first line. Every process
        reads each step and they agree (all-gather) before it is used. ``check(step, state_metadata)`` may refuse a
        step by raising (that step is not moved).

        Returns:
          (step, state, data_state), or None when no step reads.
        """
        steps = self.all_steps()[::-1]
        if which not in (None, "best", "latest"):
            if int(which) not in steps:
                raise ValueError(f"no checkpoint at step {which} in {self.directory}; available: {steps[::-1]}")
            steps = [int(which)]
        elif which != "latest" and self.best_step() in steps:  # None without validation metrics: the newest
            steps.insert(0, steps.pop(steps.index(self.best_step())))
        for step in steps:
            try:
                if check is not None:
                    check(step, _agreed(lambda s=step: self.state_metadata(s)))
                return step, *_verified(*_agreed(lambda s=step: self._read(s, abstract_state)))
            except UnreadableStepError as e:
                self._set_aside(step, str(e))
                self._manager.reload()
        return None

    def _set_aside(self, step: int, why: str) -> None:
        """Moves an unreadable step into ``CORRUPT`` (process 0; left in place where that fails: read-only)."""
        if jax.process_index() == 0:
            dest = epath.Path(self.directory) / CORRUPT / str(step)
            if dest.exists():  # the same step number went bad before
                dest = dest.with_name(f"{step}.{time.time_ns()}")
            try:
                move(epath.Path(self.directory) / str(step), dest)
                where = f"moved to {dest}"
            except OSError as e:
                where = f"skipped (cannot move it aside: {e.strerror or e})"
            log.warning("checkpoint step %d in %s is unreadable (%s); %s", step, self.directory, why, where)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"vtfusion_set_aside_{step}")

    def state_metadata(self, step: int) -> Any:
        """The saved state's tree with shape / dtype metadata leaves (nothing is restored)."""
        path = epath.Path(self.directory) / str(int(step)) / STATE
        meta = ocp.StandardCheckpointHandler().metadata(path)
        return getattr(meta, "tree", meta)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases resources."""
        self._manager.wait_until_finished()
        self._manager.close()
        self._empty_trash()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _bad_metrics(directory: str, best_fn: Callable | None) -> list[tuple[int, str]]:
    """(step, error) of the steps whose saved validation metrics do not read."""
    out = []
    directory = epath.Path(directory)
    for name in [p.name for p in directory.iterdir()] if directory.is_dir() else []:
        path = directory / name / "metrics" / "metrics"
        if name.isdigit() and path.exists():
            try:
                (best_fn or dict)(read_json(path))
            except Exception as e:  # noqa: BLE001 (not JSON, not a dict, no such metric, not a number)
                out.append((int(name), first_line(e)))
    return sorted(out)


def _agreed(read: Callable[[], Any]) -> Any:
    """``read()``, or UnreadableStepError if it raised on any process (every process calls this the same times)."""
    try:
        out, err = read(), None
    except Exception as e:  # noqa: BLE001 (Orbax / TensorStore raise many types for a damaged file)
        while e.__cause__ is not None:  # Orbax wraps the TensorStore error that says what is wrong
            e = e.__cause__
        out, err = None, first_line(e)
        _quiet_abandoned_reads()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.process_allgather(np.int32(err is not None))
        err = err or ("unreadable on another process" if failed.any() else None)
    if err is not None:
        raise UnreadableStepError(err)
    return out


_QUIET = []


def _quiet_abandoned_reads() -> None:
    """A failed Orbax read leaves TensorStore reads in flight; when they finish they find the event loop closed
    ("Event loop is closed" from another thread) and their coroutines, collected later, complain ("Exception ignored
    in <coroutine _read_array_index_and_device_put>", "never awaited"), or their tasks' unretrieved exceptions reach
    asyncio's logger ("Task exception was never retrieved" + a traceback): from then on those reports are dropped
    (any other goes to the hooks and handlers as before)."""
    if _QUIET:
        return
    _QUIET.append(True)
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def noise(value, obj=None) -> bool:
        return str(value) == "Event loop is closed" or "_read_array_index_and_device_put" in repr(obj)

    sys.excepthook = lambda kind, value, tb: noise(value) or excepthook(kind, value, tb)
    sys.unraisablehook = lambda u: noise(u.exc_value, u.object) or unraisablehook(u)
    warnings.filterwarnings("ignore", "coroutine '_read_array_index_and_device_put' was never awaited")
    logging.getLogger("asyncio").addFilter(lambda r: "_read_array_index_and_device_put" not in r.getMessage())


def digest(tree: Any) -> dict[str, int]:
    """A checksum per array of ``tree`` (global jax.Arrays or numpy), by path (preflight.leaves_by_path), the same
    whatever the mesh: the sum, mod 2**32, of the array's bit patterns times odd weights 2 * position + 1 (a flipped
    bit changes it by an odd multiple of a power of two < 2**32, never 0). Computed on the host, shard by shard (each
    replica once), summed over processes."""
    leaves = leaves_by_path(tree)
    sums = []
    for x in leaves.values():
        if isinstance(x, jax.Array):
            shards = [(s.index, np.asarray(s.data)) for s in x.addressable_shards if s.replica_id == 0]
        else:
            x = np.asarray(x)
            shards = [((), x)]
        sums.append(sum(_shard_digest(a, i, x.shape) for i, a in shards) % 2**32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sums = multihost_utils.process_allgather(np.asarray(sums, np.uint32)).sum(0, dtype=np.uint32)
    return {k: int(v) for k, v in zip(leaves, sums, strict=True)}


def _shard_digest(a: np.ndarray, index: tuple, shape: tuple) -> int:
    # sum(bits * (2 * pos + 1)) = sum(bits) + 2 * sum over axes d of stride_d * sum_i (start_d + i) * (bits summed
    # over the other axes)[i]: no position array is built.
    bits = a.view(f"u{a.dtype.itemsize}").astype(np.uint32, copy=False)
    total = int(bits.sum(dtype=np.uint32))
    for d in range(a.ndim):
        start = index[d].indices(shape[d])[0] if d < len(index) else 0
        rows = bits.sum(axis=tuple(k for k in range(a.ndim) if k != d), dtype=np.uint32)
        weighted = int((np.arange(len(rows), dtype=np.uint32) * rows).sum(dtype=np.uint32)) + start * int(
            rows.sum(dtype=np.uint32)
        )
        total += 2 * math.prod(shape[d + 1 :]) * weighted
    return total % 2**32


def _verified(state: Any, data: dict) -> tuple[Any, dict]:
    want = data.pop(DIGEST, None)
    if want is not None and want != digest(state):
        raise UnreadableStepError("the arrays differ from the checksum saved with them")
    return state, data
