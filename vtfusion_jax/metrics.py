"""Classification metrics on numpy arrays (accuracy, per type, confusion matrix; captions and retrieval:
metrics_caption.py) and metric writers (TensorBoard event files + metrics.jsonl)."""

from __future__ import annotations

import abc
import io
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from vtfusion_jax.preflight import CorruptFileError, append_text, copy_tree, first_line, is_local


def accuracy(pred: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Share of valid rows where pred == label (nan when there are none).

    Args:
      pred, label: int [N] predicted and true classes.
      valid: bool [N] (default all True).

    Returns:
      Accuracy in [0, 1].
    """
    pred, label = np.asarray(pred), np.asarray(label)
    valid = np.ones(pred.shape, bool) if valid is None else np.asarray(valid, bool)
    n = int(valid.sum())
    return float(((pred == label) & valid).sum() / n) if n else float("nan")


def per_type_accuracy(
    pred: np.ndarray, label: np.ndarray, types: np.ndarray, type_names: Sequence[str], valid: np.ndarray | None = None
) -> dict[str, float]:
    """Accuracy for each type name (question type, relational family, ...); types absent from the data are omitted.

    Args:
      pred, label, valid: int [N], int [N], bool [N].
      types, type_names: int [N] indices into ``type_names``, the names of the types.

    Returns:
      {type name: accuracy}.
    """
    types = np.asarray(types)
    valid = np.ones(types.shape, bool) if valid is None else np.asarray(valid, bool)
    out = {}
    for i, name in enumerate(type_names):
        sel = valid & (types == i)
        if sel.any():
            out[name] = accuracy(pred, label, sel)
    return out


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int, valid: np.ndarray | None = None):
    """Counts ``m[true, predicted]`` over valid rows. Returns int64 [C, C]."""
    pred, label = np.asarray(pred), np.asarray(label)
    valid = np.ones(pred.shape, bool) if valid is None else np.asarray(valid, bool)
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (label[valid], pred[valid]), 1)
    return m


def majority_baseline(train_labels: np.ndarray, eval_labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent training label."""
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    return float(np.mean(np.asarray(eval_labels) == values[np.argmax(counts)]))


# clu.metric_writers' interface, without clu: importing it pulls in TensorFlow, not a dependency here.


class MetricWriter(abc.ABC):
    """Interface: ``write_scalars(step, {name: value})``, ``write_hparams(dict)``, ``write_images(step, {tag: image})``,
    ``flush()``, ``close()``."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records ``{name: value}`` at ``step``."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams

    def write_images(self, step: int, images: Mapping[str, np.ndarray | bytes]) -> None:
        """Records ``{tag: uint8 [H, W] / [H, W, 3 | 4] array or PNG bytes}`` at ``step`` (writers without images
        ignore them)."""
        del step, images

    def flush(self) -> None:  # noqa: B027  (optional hook: buffering writers override it)
        pass

    def close(self) -> None:
        self.flush()


class LoggingWriter(MetricWriter):
    """Scalars to the Python log (INFO)."""

    def write_scalars(self, step, scalars):
        text = ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items())
        logging.getLogger("vtfusion_jax.metrics").info("[%d] %s", int(step), text)


class TensorBoardWriter(MetricWriter):
    """Scalars, images and hparams (as text) to TensorBoard event files via the `tensorboard` package (no TF)."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        # An object store cannot append to the event file: write it locally, upload the whole file on each flush.
        self._remote = None if is_local(logdir) else logdir
        self._local = logdir if self._remote is None else tempfile.mkdtemp(prefix="vtfusion_events_")
        self._writer = EventFileWriter(self._local)

    def _add(self, step: int, summary) -> None:
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step, scalars):
        from tensorboard.compat.proto import summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._add(step, summary_pb2.Summary(value=values))

    def write_hparams(self, hparams):
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2

        text = json.dumps({k: str(v) for k, v in hparams.items()}, sort_keys=True, indent=1)
        shape = tensor_shape_pb2.TensorShapeProto()
        tensor = tensor_pb2.TensorProto(dtype=7, string_val=[text.encode()], tensor_shape=shape)  # 7 = DT_STRING
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        self._add(0, summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="config", tensor=tensor, metadata=meta)]))

    def write_images(self, step, images):
        from PIL import Image
        from tensorboard.compat.proto import summary_pb2

        values = []
        for tag, image in images.items():
            if not isinstance(image, bytes):  # TensorBoard stores encoded images
                buf = io.BytesIO()
                Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
                image = buf.getvalue()
            with Image.open(io.BytesIO(image)) as im:  # reads the header only
                (w, h), channels = im.size, len(im.getbands())
            image_pb = summary_pb2.Summary.Image(height=h, width=w, colorspace=channels, encoded_image_string=image)
            values.append(summary_pb2.Summary.Value(tag=tag, image=image_pb))
        self._add(step, summary_pb2.Summary(value=values))

    def flush(self):
        self._writer.flush()
        if self._remote is not None:
            copy_tree(self._local, self._remote)

    def close(self):
        self._writer.close()
        if self._remote is not None:
            copy_tree(self._local, self._remote)
            shutil.rmtree(self._local, ignore_errors=True)


def _drop_partial_last_line(path: str) -> None:
    """A run killed mid-append leaves a last line without its newline; the resumed run would glue its first row to
    it. Cut the file back to its last complete line (rows after the last checkpoint are logged again anyway)."""
    path = epath.Path(path)
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class JsonlWriter(MetricWriter):
    """One JSON object per logged step, {"step": s, name: value, ...}, appended to a file.

    Scalars written for the same step (train metrics, then validation) are merged into one line, flushed when
    a later step arrives or on flush().
    """

    def __init__(self, path: str):
        self._path = path
        self._row: dict | None = None
        _drop_partial_last_line(path)

    def write_scalars(self, step, scalars):
        if self._row is not None and self._row["step"] != int(step):
            self.flush()
        if self._row is None:
            self._row = {"step": int(step)}
        for k, v in scalars.items():
            v = float(v)
            self._row[k] = v if math.isfinite(v) else str(v)  # JSON has no nan / inf

    def flush(self):
        if self._row is not None:
            append_text(self._path, json.dumps(self._row) + "\n")
            self._row = None


class MultiWriter(MetricWriter):
    """Fans every call out to several writers."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def write_images(self, step, images):
        for w in self.writers:
            w.write_images(step, images)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def create_writer(workdir: str, *, is_main: bool) -> MetricWriter:
    """Logging everywhere; TensorBoard events and ``workdir/metrics.jsonl`` on the main process only."""
    writers: list[MetricWriter] = [LoggingWriter()]
    if is_main:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        writers += [TensorBoardWriter(workdir), JsonlWriter(str(epath.Path(workdir) / "metrics.jsonl"))]
    return MultiWriter(writers)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a metrics.jsonl file (a half-written last line, from a killed run, is dropped); a garbled line raises
    CorruptFileError naming the file and line."""
    lines = epath.Path(path).read_bytes().split(b"\n")[:-1]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except (ValueError, RecursionError) as e:
            raise CorruptFileError(f"{path}:{n}: not JSON ({first_line(e)})") from None
        if not isinstance(row, dict):
            raise CorruptFileError(f"{path}:{n}: a JSON {type(row).__name__}, not an object")
        rows += [row] if row else []
    return rows
