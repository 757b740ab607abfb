"""One image through a trained model of any task; prints the result.

  python predict.py --workdir=runs/easy_vqa --image=photo.png --question="what shape is this?" \
      [--attention_map=out.png] [--checkpoint=best]                                  # VQA: answer + top 5
  python predict.py --workdir=runs/soc_caption --image=scene.png                     # captioning: beam search
  python predict.py --workdir=runs/soc_retrieval --image=scene.png --retrieve=captions.txt   # rank captions
  python predict.py --exported=runs/easy_vqa/export --image=photo.png --question="..."  # eval.py --export's folder
"""

import os
import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_string("image", None, "Image file.")
flags.DEFINE_string("question", None, "VQA: question about the image.")
flags.DEFINE_string("attention_map", None, "VQA: optional PNG, the question's attention drawn on the image.")
flags.DEFINE_string("checkpoint", "best", "best | latest | a step.")
flags.DEFINE_string("retrieve", None, "Retrieval: captions to rank, a text file (one per line) or 'a|b|c'.")
flags.DEFINE_string("exported", None, "VQA: a folder written by eval.py --export, instead of --workdir (no config).")
flags.mark_flags_as_required(["image"])
flags.mark_flags_as_mutual_exclusive(["workdir", "exported"], required=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import logging

    from vtfusion_jax import eval_lib, export, preflight

    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    captions = None
    if FLAGS.retrieve:  # a text file, one caption per line, or 'a|b|c'
        is_file = os.path.exists(FLAGS.retrieve)
        texts = open(FLAGS.retrieve).read().split("\n") if is_file else FLAGS.retrieve.split("|")
        captions = [c.strip() for c in texts if c.strip()]
    try:
        if FLAGS.exported and (captions or FLAGS.attention_map):
            raise eval_lib.PredictError(
                "an exported model answers questions: --retrieve, --attention_map need --workdir"
            )
        if FLAGS.exported:
            out = export.predict(FLAGS.exported, FLAGS.image, FLAGS.question)
        else:
            out = eval_lib.predict(FLAGS.workdir, FLAGS.image, question=FLAGS.question, captions=captions,
                                   attention_map=FLAGS.attention_map, checkpoint=FLAGS.checkpoint)  # fmt: skip
    except (eval_lib.PredictError, FileNotFoundError, preflight.CorruptFileError, export.ExportError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if "answer" in out:
        print(f"answer: {out['answer']}")
        for name, p in out["top"]:
            print(f"  {p:7.2%}  {name}")
        if FLAGS.attention_map:
            print(f"attention map: {FLAGS.attention_map}")
    elif "ranked" in out:
        for r in out["ranked"]:
            print(f"  ITM {r['itm']:8.3f}  ITC {r['itc']:6.3f}  {r['caption']}")
    else:
        print(f"caption: {out['caption']}  (normalised log-probability {out['score']:.4f})")
    print(f"checkpoint step: {out['checkpoint_step']}")  # the step used (after a fallback, an older one)


if __name__ == "__main__":
    app.run(main)
