"""Evaluates a trained checkpoint on a split and writes DIR/eval/<split>/ (metrics.json, predictions.jsonl,
confusion_matrix.png, attention_*.png).

  python eval.py --config=configs/easy_vqa.py --workdir=runs/easy_vqa --split=test [--checkpoint=best]

Without --config the run's own workdir/config.json is used.
"""

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config (default: the run's workdir/config.json).")
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_string("split", None, "Split to evaluate (default: config.eval.split, e.g. test).")
flags.DEFINE_string("checkpoint", None, "best | latest | a step (default: config.eval.checkpoint).")
flags.DEFINE_integer("num_attention_maps", None, "Attention-map PNGs (default: config.eval.num_attention_maps).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from vtfusion_jax import eval_lib, host_memory, train_lib

    host_memory.reuse_freed_memory_on_cpu()  # before jax starts a backend: reuse XLA:CPU's step buffers
    train_lib.maybe_initialize_distributed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = FLAGS.config if FLAGS.config is not None else eval_lib.load_config(FLAGS.workdir)
    split = FLAGS.split or config.eval.split
    if "task" in config and config.task != "vqa":  # retrieval / captioning (vtfusion_jax/tasks)
        from vtfusion_jax import tasks

        result = tasks.evaluate_split(config, FLAGS.workdir, split, FLAGS.checkpoint or config.eval.checkpoint)
        print(f"{split}: {json.dumps({k: v for k, v in result.items() if k != 'protocol'})}", flush=True)
        return
    n_maps = config.eval.num_attention_maps if FLAGS.num_attention_maps is None else FLAGS.num_attention_maps
    result = eval_lib.evaluate_split(
        config, FLAGS.workdir, split, FLAGS.checkpoint or config.eval.checkpoint, num_attention_maps=n_maps
    )
    brief = {k: result[k] for k in ("accuracy", "num_examples", "checkpoint_step", "per_type")}
    print(f"{split}: {json.dumps(brief)}", flush=True)


if __name__ == "__main__":
    from vtfusion_jax import config_lib

    config_lib.check_overrides(sys.argv)
    app.run(main)
