"""Answers a question about an image with a trained model; prints the answer and its top-5 probabilities.

  python predict.py --workdir=runs/easy_vqa --image=photo.png --question="what shape is this?" \
      [--attention_map=out.png] [--checkpoint=best]
  python predict.py --workdir=runs/soc_caption --image=scene.png --caption          # beam-search caption
  python predict.py --workdir=runs/soc_retrieval --image=scene.png --retrieve=captions.txt   # rank captions
"""

import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_string("image", None, "Image file.")
flags.DEFINE_string("question", None, "Question about the image.")
flags.DEFINE_string("attention_map", None, "Optional PNG: the question's attention drawn on the image.")
flags.DEFINE_string("checkpoint", "best", "best | latest | a step.")
flags.DEFINE_bool("caption", False, "Caption the image (a caption run's workdir; beam search).")
flags.DEFINE_string("retrieve", None, "Rank captions for the image: a text file (one per line) or 'a|b|c'.")
flags.mark_flags_as_required(["workdir", "image"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import logging

    from vtfusion_jax import eval_lib

    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if FLAGS.caption or FLAGS.retrieve:
        import os

        from vtfusion_jax import tasks

        config = eval_lib.load_config(FLAGS.workdir)
        if FLAGS.caption:
            out = tasks.caption_image(config, FLAGS.workdir, FLAGS.image, FLAGS.checkpoint)
            print(f"caption: {out['caption']}  (normalised log-probability {out['score']:.4f})")
            return
        if os.path.exists(FLAGS.retrieve):
            with open(FLAGS.retrieve) as f:
                captions = [line.strip() for line in f if line.strip()]
        else:
            captions = [c.strip() for c in FLAGS.retrieve.split("|") if c.strip()]
        for r in tasks.rank_captions(config, FLAGS.workdir, FLAGS.image, captions, FLAGS.checkpoint):
            print(f"  ITM {r['itm']:8.3f}  ITC {r['itc']:6.3f}  {r['caption']}")
        return
    if FLAGS.question is None:
        print("error: --question is required (or --caption / --retrieve)", file=sys.stderr, flush=True)
        sys.exit(2)
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
