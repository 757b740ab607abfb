"""Input-pipeline throughput: dataset build time and examples/s at batch 256 for easy-VQA and Sort-of-CLEVR.

    python benchmarks/input_pipeline.py                      # full datasets in $TFDS_DATA_DIR (built if absent)
    python benchmarks/input_pipeline.py --data_dir=/tmp/tfds --augment
    python benchmarks/input_pipeline.py --smoke              # tiny Sort-of-CLEVR in a temp dir, a few steps

One JSON line per dataset: build time, host rate of `BatchReader.train_batch`, end-to-end `make_train_iterator` rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from vtfusion_jax.data import datasets, pipeline
from vtfusion_jax.data.tokenizer import Tokenizer

SMOKE_SOC = dict(num_train=8, num_validation=1, num_test=1, seed=0)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="easy_vqa,sort_of_clevr", help="comma-separated dataset names")
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--batch_size", type=int, default=256, help="global batch size")
    p.add_argument("--steps", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--num_threads", type=int, default=2, help="grain threads building batches")
    p.add_argument("--worker_count", type=int, default=0, help="grain worker processes (0 = threads only)")
    p.add_argument("--prefetch", type=int, default=2, help="batches kept ready on device")
    p.add_argument("--augment", action="store_true", help="random crops on")
    p.add_argument("--smoke", action="store_true", help="tiny Sort-of-CLEVR, batch 32, 3 steps, temp dir")
    return p.parse_args(argv)


def _rate(fn, steps, warmup, batch_size):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return steps * batch_size / (time.perf_counter() - start)


def bench(name, args, data_dir, builder_kwargs, mesh, tokenizer) -> dict:
    """Builds (if absent) and measures one dataset; returns the result row."""
    probe = datasets.get_builder(name, data_dir=data_dir, builder_kwargs=builder_kwargs, prepare=False)
    already = (probe.data_path / "dataset_info.json").exists()
    start = time.perf_counter()
    meta = datasets.dataset_meta(name, data_dir=data_dir, builder_kwargs=builder_kwargs)
    build_s = None if already else round(time.perf_counter() - start, 2)
    common = dict(dataset=name, split="train", global_batch_size=args.batch_size, seed=0, tokenizer=tokenizer,
                  augment=args.augment, data_dir=data_dir, builder_kwargs=builder_kwargs)  # fmt: skip
    # the iterators normalise on device, so the host work is decode + crop + tokenise
    reader = pipeline.BatchReader(rows=slice(0, args.batch_size), **common)
    step = iter(range(10**9))
    host = _rate(lambda: reader.train_batch(next(step)), args.steps, args.warmup, args.batch_size)
    it = pipeline.make_train_iterator(mesh=mesh, prefetch=args.prefetch, worker_count=args.worker_count,
                                      num_threads=args.num_threads, **common)  # fmt: skip
    try:
        e2e = _rate(lambda: next(it), args.steps, args.warmup, args.batch_size)
    finally:
        it.close()
    row = dict(dataset=name, num_train_examples=meta["num_examples"]["train"], image_shape=list(meta["image_shape"]))
    row.update(build_s=build_s, batch_size=args.batch_size, host_single_thread_examples_per_s=round(host, 1))
    row.update(iterator_examples_per_s=round(e2e, 1), num_threads=args.num_threads, worker_count=args.worker_count)
    return row | dict(augment=args.augment, devices=jax.device_count(), cpus=os.cpu_count())


def main(argv=None) -> list[dict]:
    args = _parse(sys.argv[1:] if argv is None else argv)
    names, kwargs = args.datasets.split(","), None
    if args.smoke:
        names, kwargs, args.batch_size, args.steps, args.warmup = ["sort_of_clevr"], SMOKE_SOC, 32, 3, 1
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    tokenizer = Tokenizer(max_len=32)
    rows = []
    with tempfile.TemporaryDirectory() if args.smoke else contextlib.nullcontext(args.data_dir) as data_dir:
        for name in names:
            rows.append(bench(name, args, data_dir or datasets.default_data_dir(), kwargs, mesh, tokenizer))
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
