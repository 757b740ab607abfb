"""Trains a vision-text fusion model; resumes automatically from the newest complete checkpoint in --workdir.

  python train.py --config=configs/easy_vqa.py --workdir=runs/easy_vqa [--config.optim.lr=1e-3 ...]

Writes workdir/config.json, workdir/checkpoints/ (Orbax), TensorBoard events and workdir/metrics.jsonl.
Exit codes: 0 done (or preempted by SIGTERM after saving a checkpoint), 1 non-finite loss, unusable workdir or damaged
input file (a one-line message; an unreadable checkpoint is not one: the newest one that reads is resumed).
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:ARG]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, logs); an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from vtfusion_jax import host_memory, preflight, train_lib  # after flag parsing: jax starts here

    host_memory.reuse_freed_memory_on_cpu()  # before jax starts a backend: reuse XLA:CPU's step buffers
    train_lib.maybe_initialize_distributed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (train_lib.NonFiniteLossError, preflight.WorkdirError, preflight.CorruptFileError) as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    status = "done" if result["stop_reason"] == "num_steps" else f"stopped ({result['stop_reason']})"
    print(f"{status} at step {result['step']}; best validation {result['best_val']:.4f} at step {result['best_step']}",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    from vtfusion_jax import config_lib

    config_lib.check_overrides(sys.argv)
    app.run(main)
