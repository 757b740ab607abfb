"""Multi-scale ablation (issue 10): an existing experiment with its CNN's image tokens taken from 1, 2 or 3 stages.

Run: python train.py --config=configs/multiscale.py:base=easy_vqa,num_scales=2 --workdir=runs/ms_easy_vqa_multi
     python train.py --config=configs/multiscale.py:base=sort_of_clevr,fusion=cross,num_scales=1 --workdir=...
The base config (configs/<base>.py) is loaded unchanged except ``model.image_encoder.scales`` (and, for
Sort-of-CLEVR, its ':fusion=' argument): num_scales=1 -> () (the last conv stage only, the single-scale encoder),
num_scales=k -> (-k, ..., -1) (the last k stages, each projected to the model width with its own 2-D position
embedding and a learned scale embedding; vtfusion_jax/models/vision.py). Each table row:
python scripts/run.py --name=multiscale/<row> --config=configs/multiscale.py:<arg> --split=validation.
"""

import os

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import load_config, parse_arg

common = config_lib.sibling(__file__, "common")

BASES = ("easy_vqa", "sort_of_clevr")


def get_config(arg=None):
    """Returns the locked base config with ``model.image_encoder.scales`` set; ``arg`` "base=..,num_scales=.."."""
    arg = parse_arg(arg, base="easy_vqa", fusion="cross", num_scales=1, accel=False)
    if arg.base not in BASES:
        raise ValueError(f"unknown base {arg.base!r}; valid: {BASES}")
    if arg.num_scales < 1:
        raise ValueError(f"num_scales must be >= 1, got {arg.num_scales}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{arg.base}.py")
    spec = f"{path}:fusion={arg.fusion}" if arg.base == "sort_of_clevr" else path
    c = load_config(spec)
    if arg.base == "easy_vqa":  # easy-VQA's config takes no argument: the fusion is a field
        with c.unlocked():
            c.model.fusion.name = arg.fusion
            # The ablation (results/multiscale/) ran on the main job's config as it was then; pinned so it reproduces.
            c.model.fusion.pool_product = False
            c.model.text_encoder.depth = 1
            c.train.focal_gamma = 0.0
            c.dataset.max_len = 16
            c.train.eval_every_steps = c.train.checkpoint_every_steps = 150
    with c.unlocked():
        # () = the last stage only (the single-scale encoder, same parameter names); (-k..-1) = the last k stages.
        c.model.image_encoder.scales = tuple(range(-arg.num_scales, 0)) if arg.num_scales > 1 else ()
    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
