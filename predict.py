"""Answers a question about an image with a trained model; prints the answer and its top-5 probabilities.

  python predict.py --workdir=runs/easy_vqa --image=photo.png --question="what shape is this?" \
      [--attention_map=out.png] [--checkpoint=best]
"""

import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_string("image", None, "Image file.")
flags.DEFINE_string("question", None, "Question about the image.")
flags.DEFINE_string("attention_map", None, "Optional PNG: the question's attention drawn on the image.")
flags.DEFINE_string("checkpoint", "best", "best | latest | a step.")
flags.mark_flags_as_required(["workdir", "image", "question"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import logging

    from vtfusion_jax import eval_lib

    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        out = eval_lib.predict(FLAGS.workdir, FLAGS.image, FLAGS.question, FLAGS.attention_map, FLAGS.checkpoint)
    except (eval_lib.PredictError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"answer: {out['answer']}")
    for name, p in out["top"]:
        print(f"  {p:7.2%}  {name}")
    if FLAGS.attention_map:
        print(f"attention map: {FLAGS.attention_map}")


if __name__ == "__main__":
    app.run(main)
