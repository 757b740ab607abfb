"""Evaluates a trained checkpoint of any task on a split and writes DIR/eval/<split>/ (metrics.json and the task's
files: VQA predictions.jsonl, confusion_matrix.png, attention_*.png, these PNGs also as TensorBoard images;
captioning captions.jsonl); --export writes a jax.export folder of a VQA checkpoint instead (vtfusion_jax/export.py).

  python eval.py --config=configs/easy_vqa.py --workdir=runs/easy_vqa --split=test [--checkpoint=best]
  python eval.py --workdir=runs/easy_vqa --export=runs/easy_vqa/export [--export_platforms=cpu,cuda,tpu]   # VQA

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
flags.DEFINE_integer("num_attention_maps", None, "VQA attention-map PNGs (default: config.eval.num_attention_maps).")
flags.DEFINE_string("export", None, "Instead of evaluating: export the checkpoint here (predict.py --exported).")
flags.DEFINE_list("export_platforms", None, "With --export: platforms, e.g. cpu,cuda,tpu (default: this machine's).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from vtfusion_jax import eval_lib, export, host_memory, preflight, train_lib

    host_memory.reuse_freed_memory_on_cpu()  # before jax starts a backend: reuse XLA:CPU's step buffers
    train_lib.maybe_initialize_distributed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = FLAGS.config if FLAGS.config is not None else eval_lib.load_config(FLAGS.workdir)
        if FLAGS.num_attention_maps is not None:
            with config.unlocked():
                config.eval.num_attention_maps = FLAGS.num_attention_maps
        split, checkpoint = FLAGS.split or config.eval.split, FLAGS.checkpoint or config.eval.checkpoint
        if FLAGS.export:
            meta = export.export_model(config, FLAGS.workdir, FLAGS.export, checkpoint, FLAGS.export_platforms)
            print(f"exported step {meta['checkpoint_step']} for {meta['platforms']} to {FLAGS.export}", flush=True)
            return
        result = eval_lib.evaluate_split(config, FLAGS.workdir, split, checkpoint)
    except (FileNotFoundError, preflight.CorruptFileError, export.ExportError) as e:  # no readable checkpoint, a
        print(f"ERROR: {e}", file=sys.stderr, flush=True)  # damaged file, a task export does not take
        sys.exit(1)
    brief = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "protocol"}
    brief.update({"per_type": result["per_type"]} if "per_type" in result else {})
    print(f"{split}: {json.dumps(brief)}", flush=True)


if __name__ == "__main__":
    from vtfusion_jax import config_lib

    config_lib.check_overrides(sys.argv)
    app.run(main)
