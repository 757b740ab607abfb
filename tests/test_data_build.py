"""Build-once semantics across processes, the benchmark's smoke run, grain worker processes."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from vtfusion_jax.data import pipeline
from vtfusion_jax.data.tokenizer import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
KW = dict(num_train=4, num_validation=1, num_test=1, seed=5)

_BUILD = """
import json, sys
from vtfusion_jax.data import datasets
meta = datasets.dataset_meta("sort_of_clevr", data_dir=sys.argv[1], builder_kwargs=json.loads(sys.argv[2]))
print("NUM", meta["num_examples"]["train"])
"""


def test_concurrent_processes_build_once(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", _BUILD, str(tmp_path), json.dumps(KW)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("NUM 80" in o for o in outs), outs
    assert sum(o.count("Building sort_of_clevr") for o in outs) == 1, outs  # the other waited on the lock
    assert len(list(tmp_path.glob("sort_of_clevr/*/1.0.0/*train.array_record*"))) == 1


def test_benchmark_smoke(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import input_pipeline
    finally:
        sys.path.pop(0)
    rows = input_pipeline.main(["--smoke"])
    assert len(rows) == 1 and rows[0]["dataset"] == "sort_of_clevr"
    assert rows[0]["iterator_examples_per_s"] > 0 and rows[0]["host_single_thread_examples_per_s"] > 0
    assert rows[0]["build_s"] is not None
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["batch_size"] == 32


def test_worker_processes_give_the_same_batches(tmp_path):
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("data",))
    common = dict(dataset="sort_of_clevr", split="train", global_batch_size=16, seed=3, mesh=mesh,
                  tokenizer=Tokenizer(max_len=16), data_dir=str(tmp_path), builder_kwargs=KW)  # fmt: skip
    threads = pipeline.make_train_iterator(**common)
    workers = pipeline.make_train_iterator(worker_count=2, **common)
    try:
        for _ in range(3):
            a, b = next(threads), next(workers)
            for k in a:
                np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    finally:
        threads.close()
        workers.close()
