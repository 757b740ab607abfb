"""Checkpoints: the only module that touches Orbax.

Layout: ``workdir/checkpoints/<step>/{state, data}`` (TrainState, every process writing its shards; the data
iterator's JSON state); saves are asynchronous. A step folder is complete or absent even under SIGKILL (Orbax renames
``s.orbax-checkpoint-tmp*`` to ``s`` when done; old steps are renamed into ``_deleted/`` before removal). Retention:
the newest ``keep`` plus the best by the validation metric (steps saved without one count only as "newest").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

STATE, DATA = "state", "data"
TRASH = "_deleted"  # old steps are renamed here, then removed (see the module docstring)


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
          read_only: never write or delete (evaluation).
        """
        self.directory = os.path.abspath(directory)
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
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))
        self._empty_trash()

    def _empty_trash(self) -> None:
        """Removes steps that retention renamed into ``TRASH`` (process 0; entries one by one, since Orbax may be
        renaming another one in concurrently)."""
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
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(dict(data_state))})
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._empty_trash()
        return self._manager.save(int(step), args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state`` (ShapeDtypeStructs with
        ``sharding`` set, or arrays). Returns (state, data_state)."""
        abstract = jax.tree.map(_abstract, abstract_state)
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract), DATA: ocp.args.JsonRestore()})
        out = self._manager.restore(int(step), args=args)
        return out[STATE], dict(out[DATA] or {})

    def state_metadata(self, step: int) -> Any:
        """The saved state's tree with shape / dtype metadata leaves (nothing is restored)."""
        from etils import epath

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


def resolve_step(ckpt: Checkpointer, which: str | int | None) -> int:
    """Turns ``which`` ("best" (also None), "latest", or an int / digit string) into a saved step, or raises with
    the available ones."""
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
    if which is None or which == "best":
        return int(ckpt.best_step())
    if which == "latest":
        return int(ckpt.latest_step())
    step = int(which)
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step} in {ckpt.directory}; available: {steps}")
    return step
