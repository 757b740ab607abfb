"""Tasks, chosen by ``config.task`` (TASKS): what a run optimises and how it is evaluated (tasks/base.py)."""

from __future__ import annotations

import jax

from vtfusion_jax.tasks.base import Task
from vtfusion_jax.tasks.caption import CaptionTask
from vtfusion_jax.tasks.retrieval import RetrievalTask
from vtfusion_jax.tasks.vqa import PredictError, VqaTask

TASKS: dict[str, type[Task]] = {"vqa": VqaTask, "retrieval": RetrievalTask, "caption": CaptionTask}

__all__ = ["TASKS", "PredictError", "Task", "make_task"]


def make_task(config, mesh: jax.sharding.Mesh | None = None, workdir: str | None = None) -> Task:
    """The ``config.task`` task (``workdir``: an existing run, whose saved assets are loaded).

    Raises:
      ValueError: an unknown task name (the message lists the valid ones).
    """
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; valid: {sorted(TASKS)}")
    return TASKS[config.task](config, mesh, workdir)
