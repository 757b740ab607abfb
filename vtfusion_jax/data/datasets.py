"""Dataset registry: name (+ `builder_kwargs`) -> a TFDS builder, built once on first use into `array_record` under
`data_dir`; metadata and a random-access `tfds` data source per split.

A damaged prepared dataset (`dataset_info.json` that does not parse, an `array_record` file that fails to open or to
read a record) raises a one-line CorruptFileError naming the file and how to rebuild it; a generated one (GENERATED)
is first moved aside to `<folder>.corrupt`, so that its next use rebuilds it (at open: at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import os
import time

import jax
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath

from vtfusion_jax.data import clevr, coco, easy_vqa, manifest, sort_of_clevr
from vtfusion_jax.preflight import CorruptFileError, copy_tree, first_line, is_local


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How the pipeline reads one dataset.

    Attributes:
      make_builder: (data_dir, builder_kwargs) -> tfds builder.
      text_key, label_key: features holding the input text and the ClassLabel target.
      type_key: ClassLabel feature used as `question_type` in batches (per-type metrics).
      extra_keys: feature name -> batch key for additional numeric features.
      per_question: for a builder storing one record per image with its questions, the module flattening it to
        one record per question (SPLITS, question_source(builder, split, local data_dir): data/clevr.py).
    """

    make_builder: object
    text_key: str
    label_key: str
    type_key: str
    extra_keys: tuple[tuple[str, str], ...] = ()
    per_question: object = None


def _easy_vqa_builder(data_dir, kwargs):
    return easy_vqa.EasyVqa(data_dir=data_dir, **kwargs)


def _sort_of_clevr_builder(data_dir, kwargs):
    kwargs = dict(kwargs)
    sizes = {k: kwargs.pop(k) for k in ("num_train", "num_validation", "num_test", "seed") if k in kwargs}
    if sizes:
        config = sort_of_clevr.config_from_kwargs(**sizes)
        # TFDS refuses a custom config named like a registered one: the paper's sizes select "default" by name.
        kwargs["config"] = config.name if config.name == "default" else config
    return sort_of_clevr.SortOfClevr(data_dir=data_dir, **kwargs)


def _manifest_builder(data_dir, kwargs):
    kwargs = dict(kwargs)
    if not kwargs.get("path"):  # configs/manifest_vqa.py without its ':manifest=PATH' argument
        raise ValueError("dataset 'manifest' needs builder_kwargs.path: a folder or .jsonl (configs: :manifest=PATH)")
    keys = ("path", "image_dir", "image_size", "skip_bad_rows")
    config = manifest.manifest_config(**{k: kwargs.pop(k) for k in keys if k in kwargs})
    return manifest.Manifest(data_dir=data_dir, config=config, **kwargs)


def _coco_builder(data_dir, kwargs):
    if not kwargs.get("path"):
        raise ValueError("dataset 'coco' needs builder_kwargs.path: the folder of dataset_coco.json, train2014/, "
                         "val2014/ (e.g. configs/coco_retrieval.py:coco=/data/coco)")  # fmt: skip
    return coco.CocoKarpathy(data_dir=data_dir, config=coco.coco_config(**kwargs))  # path, image_size, ...


_SOC_EXTRA = (("family", "family"), ("question_code", "question_code"))  # Sort-of-CLEVR's extra batch keys
DATASETS: dict[str, DatasetSpec] = {
    "easy_vqa": DatasetSpec(_easy_vqa_builder, "question", "answer", "question_type"),
    "sort_of_clevr": DatasetSpec(_sort_of_clevr_builder, "question", "answer", "subtype", extra_keys=_SOC_EXTRA),
    "manifest": DatasetSpec(_manifest_builder, "text", "label", "question_type"),
    "clevr": DatasetSpec(clevr.make_builder, "question", "answer", "question_type", per_question=clevr),
    "coco": DatasetSpec(_coco_builder, "caption", "", ""),  # caption data only (retrieval / caption tasks)
}
GENERATED = ("easy_vqa", "sort_of_clevr")  # built from an installed package / a seeded generator: rebuilt if damaged


def get_spec(name: str) -> DatasetSpec:
    """Returns the registry entry for `name`, or raises listing the valid names."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}")
    return DATASETS[name]


def default_data_dir() -> str:
    """$TFDS_DATA_DIR if set, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process builds
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepared(builder) -> bool:
    return (builder.data_path / "dataset_info.json").exists()


def get_builder(
    name: str, *, data_dir: str | None = None, builder_kwargs: dict | None = None, prepare: bool = True
) -> tfds.core.DatasetBuilder:
    """Returns the builder of `name`, building the dataset first if it is absent.

    Every process takes a file lock first, so one builds and the others wait (also correct with a disk per host). A
    remote `data_dir` (gs://...) is mirrored into a local cache (``_mirrored``).

    Args:
      name, data_dir: a DATASETS name; TFDS data folder (default: `default_data_dir()`).
      builder_kwargs: builder options (Sort-of-CLEVR: num_train/num_validation/num_test/seed; manifest:
        path/image_dir/image_size/skip_bad_rows).
      prepare: build when absent (else the builder is returned unprepared).
    """
    data_dir = data_dir or default_data_dir()
    if not is_local(data_dir):
        return _mirrored(name, data_dir, builder_kwargs, prepare)
    try:
        builder = _make_builder(name, data_dir, builder_kwargs)
    except CorruptFileError as e:
        if name not in GENERATED:
            raise
        print(e, flush=True)
        builder = _make_builder(name, data_dir, builder_kwargs)  # moved aside: built below
    if not prepare or _prepared(builder):
        return builder
    with _file_lock(_lock_path(data_dir, builder)):
        if not _prepared(builder):
            start = time.time()
            print(f"Building {name} ({builder.data_dir}) ...", flush=True)
            builder.download_and_prepare(file_format="array_record")
            print(f"Built {name} in {time.time() - start:.1f}s", flush=True)
    # Re-create so the builder reads the info (split sizes, metadata) written by the build.
    return get_spec(name).make_builder(data_dir, dict(builder_kwargs or {}))


def _lock_path(data_dir: str, builder) -> str:
    config = builder.builder_config.name if builder.builder_config else "default"
    return os.path.join(data_dir, f".{builder.name}-{config}.lock")


def mirror_dir(uri: str) -> str:
    """The local cache folder of the remote data_dir ``uri``: $VTFUSION_DATA_CACHE (default
    ~/.cache/vtfusion_jax/data) / the URI without its ``://``."""
    cache = os.environ.get("VTFUSION_DATA_CACHE") or os.path.expanduser("~/.cache/vtfusion_jax/data")
    return os.path.join(cache, uri.replace("://", "/", 1))


def _mirrored(name: str, uri: str, builder_kwargs: dict | None, prepare: bool) -> tfds.core.DatasetBuilder:
    """The builder of `name` for the remote data_dir ``uri``, reading a local mirror (``mirror_dir``).

    Decision: array_record's open-source reader opens local files only (no gs://), so datasets are read from local
    disk. A dataset prepared at ``uri`` is downloaded once per host; one absent there is built here by process 0 and
    uploaded (dataset_info.json last: the other processes wait for it, then download).
    """
    local = mirror_dir(uri)
    builder = get_builder(name, data_dir=local, builder_kwargs=builder_kwargs, prepare=False)
    if not prepare or _prepared(builder):
        return builder
    remote = epath.Path(uri) / os.path.relpath(builder.data_dir, local)
    if not (remote / "dataset_info.json").exists():
        if jax.process_index() == 0:
            built = get_builder(name, data_dir=local, builder_kwargs=builder_kwargs)
            print(f"Uploading {name} to {remote} ...", flush=True)
            copy_tree(built.data_dir, remote, last="dataset_info.json")
            return built
        while not (remote / "dataset_info.json").exists():
            time.sleep(5)
    with _file_lock(_lock_path(local, builder)):
        if not _prepared(builder):
            print(f"Downloading {name} from {remote} ...", flush=True)
            copy_tree(remote, builder.data_dir, last="dataset_info.json")
    return get_spec(name).make_builder(local, dict(builder_kwargs or {}))


def _make_builder(name: str, data_dir: str, builder_kwargs: dict | None):
    try:
        return get_spec(name).make_builder(data_dir, dict(builder_kwargs or {}))
    except Exception as e:  # the builder reads a prepared dataset's info: is one damaged?
        for info in glob.glob(os.path.join(glob.escape(data_dir), name, "**", "dataset_info.json"), recursive=True):
            try:
                tfds.core.dataset_info.read_from_json(info)
            except Exception:  # noqa: BLE001 (not UTF-8, not JSON, not the proto's fields)
                raise _damaged(name, os.path.dirname(info), info, e) from None
        raise


def _damaged(name: str, folder: str, file: str, error: Exception) -> CorruptFileError:
    """The one-line error for a damaged file of a prepared dataset; a generated dataset is moved aside first."""
    why = f"{file} is damaged ({first_line(error)})"
    dest = folder + ".corrupt" + (f".{time.time_ns()}" if os.path.exists(folder + ".corrupt") else "")
    if name in GENERATED:  # (a gs:// data_dir is read from its local mirror: folder is local)
        with contextlib.suppress(OSError):  # another process may have moved it already
            os.rename(folder, dest)
            return CorruptFileError(f"{why}; moved {folder} to {dest}: it is rebuilt on its next use")
    return CorruptFileError(f"{why}; rebuild it: rm -r {folder}, then rerun (datasets are built on first use)")


def _count_records(name: str, folder: str, path: str, expected: int) -> None:
    try:  # the reader reads the file's footer and index (a record past the end would read as b"", silently)
        reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
        found = reader.num_records()
        with contextlib.suppress(RuntimeError):  # a damaged file may fail to close too: the count says more
            reader.close()
        if found != expected:
            raise RuntimeError(f"{found} records where dataset_info.json has {expected}")
    except RuntimeError as e:
        raise _damaged(name, folder, path, e) from None


class _Checked:
    """A split's array_record source whose read errors are CorruptFileError naming its files (picklable)."""

    def __init__(self, source, name: str, folder: str, files: list[str]):
        self.source, self.name, self.folder, self.files = source, name, folder, files

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, keys):
        try:
            return self.source.__getitems__(keys)
        except RuntimeError as e:  # riegeli: "Corrupted Riegeli/records file: chunk ... hash mismatch", ...
            raise _damaged(self.name, self.folder, " / ".join(self.files), e) from None


def get_data_source(name: str, split: str, *, data_dir: str | None = None, builder_kwargs: dict | None = None):
    """A tfds ArrayRecordDataSource (len(src), src[i], src.__getitems__(indices)) of decoded examples (dicts of
    numpy / bytes / int) of `split` ("train", "validation", "test", or TFDS slicing like "train[:10%]"); the other
    arguments as for ``get_builder``."""
    spec = get_spec(name)
    if spec.per_question is not None:  # prepared separately (TFDS's builder needs TensorFlow): never built here
        data_dir = data_dir or default_data_dir()
        builder = get_builder(name, data_dir=data_dir, builder_kwargs=builder_kwargs, prepare=not is_local(data_dir))
        local = data_dir if is_local(data_dir) else mirror_dir(data_dir)
        return spec.per_question.question_source(builder, split, local)
    base = split.split("[")[0]
    for rebuilt in (False, True):
        builder = get_builder(name, data_dir=data_dir, builder_kwargs=builder_kwargs)
        if base not in builder.info.splits:
            where = ""
            if name == "manifest":
                where = f"manifest {builder_kwargs['path']!r}: add {base}.jsonl beside train.jsonl"
            raise FileNotFoundError(f"{name} has no {base!r} split (splits: {sorted(builder.info.splits)}); {where}")
        info, folder = builder.info.splits[base], str(builder.data_path)
        try:
            for path, n in zip(info.filepaths, info.shard_lengths, strict=True):  # a truncated or foreign file fails
                _count_records(name, folder, str(path), n)
            src = builder.as_data_source(split=split)
            src.data_source = _Checked(src.data_source, name, folder, [str(p) for p in info.filepaths])
            return src
        except CorruptFileError as e:
            if rebuilt or os.path.exists(builder.data_path):  # not moved aside (not generated): nothing to rebuild
                raise
            print(e, flush=True)


def dataset_meta(name: str, *, data_dir: str | None = None, builder_kwargs: dict | None = None) -> dict:
    """Builds the dataset if absent and describes it.

    Args:
      name, data_dir, builder_kwargs: as for ``get_builder``.

    Returns:
      {"num_classes", "label_names", "type_names", "type_key", "image_shape": (H, W, 3),
       "num_examples": {split: n}, "text_key", "builder_dir"} and, for Sort-of-CLEVR, "family_names";
      for manifests "skipped_rows": {split: n}.
    """
    spec = get_spec(name)
    if spec.per_question is not None:
        kw = dict(data_dir=data_dir, builder_kwargs=builder_kwargs)
        sources = {s: get_data_source(name, s, **kw) for s in spec.per_question.SPLITS}
        feats, builder_dir = sources["train"].dataset_info.features, sources["train"].builder_dir
        counts = {s: len(src) for s, src in sources.items()}
    else:
        builder = get_builder(name, data_dir=data_dir, builder_kwargs=builder_kwargs)
        feats, builder_dir = builder.info.features, str(builder.data_dir)
        counts = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
    meta = {
        "num_classes": feats[spec.label_key].num_classes,
        "label_names": list(feats[spec.label_key].names),
        "type_names": list(feats[spec.type_key].names),
        "type_key": spec.type_key,
        "image_shape": tuple(int(d) for d in feats["image"].shape),
        "num_examples": counts,
        "text_key": spec.text_key,
        "builder_dir": builder_dir,
    }
    if "family" in feats:
        meta["family_names"] = list(feats["family"].names)
    if name == "manifest":
        meta["skipped_rows"] = dict(builder.info.metadata.get("skipped_rows", {}))
    return meta
