"""Sort-of-CLEVR captioning: CNN image tokens + a Transformer decoder with cross-attention, beam search.

Run: python train.py --config=configs/sort_of_clevr_caption.py --workdir=runs/soc_caption
     python eval.py --config=configs/sort_of_clevr_caption.py --workdir=runs/soc_caption --split=test
     python predict.py --workdir=runs/soc_caption --image=scene.png
The ':' argument manifest=PATH trains on a user dataset (JSON Lines rows {"image": ..., "caption": str | [str]}):
     python train.py --config=configs/sort_of_clevr_caption.py:manifest=my_data --workdir=runs/my_caption
Fused memory (the decoder reads a fusion variant's output tokens instead of the image tokens):
     python train.py --config=configs/sort_of_clevr_caption.py --workdir=runs/soc_caption_fused \
         --config.model.memory=fused
"""

import ml_collections
from ml_collections import config_dict

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import parse_arg

common = config_lib.sibling(__file__, "common")


def get_config(arg=None):
    """Returns the locked config; ``arg`` is "" (Sort-of-CLEVR) or "manifest=PATH" (a user dataset)."""
    arg = parse_arg(arg, manifest="", accel=False)
    c = ml_collections.ConfigDict()
    c.task = "caption"  # vqa | retrieval | caption (vtfusion_jax/tasks)
    c.seed = 0  # parameter init, dropout and data order
    c.mesh_shape = (-1, 1, 1)  # devices along ('data', 'fsdp', 'tensor'); -1 = the remaining devices

    c.dataset = ml_collections.ConfigDict()  # images and their captions (vtfusion_jax/data/captions.py)
    if arg.manifest:  # user data: JSON Lines manifests + an image folder (vtfusion_jax/data/manifest.py)
        c.dataset.name = "manifest"  # TFDS builder over the manifests, in caption mode
        c.dataset.builder_kwargs = ml_collections.ConfigDict(  # manifest builder options
            dict(
                path=arg.manifest,  # folder with train.jsonl, validation.jsonl (model selection) [, test.jsonl]
                image_size=64,  # stored square side in px (the CNN below: (64 / 8)^2 = 64 image tokens)
                image_dir=config_dict.placeholder(str),  # image paths are relative to it; None = the manifest folder
                skip_bad_rows=False,  # True: skip and count bad rows instead of raising (file:line) errors
                captions=True,  # caption mode: each row needs "caption" (a string or a list); text / label optional
            )
        )
    else:
        c.dataset.name = "sort_of_clevr"  # generator of vtfusion_jax/data/sort_of_clevr.py (one caption per image)
        c.dataset.builder_kwargs = ml_collections.ConfigDict(  # generator options
            dict(num_train=9800, num_validation=200, num_test=200, seed=0)  # images per split
        )
    c.dataset.data_dir = config_dict.placeholder(str)  # cache folder; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.dataset.train_split = "train"  # training images
    c.dataset.val_split = "validation"  # model selection
    c.dataset.image_size = config_dict.placeholder(int)  # None = as stored (75 px; a manifest's builder image_size)
    c.dataset.augment = False  # random crops (captions name positions)
    c.dataset.max_len = 48  # caption tokens incl. [BOS]/[EOS], longer ones truncated (longest scene caption: 44)

    c.model = ml_collections.ConfigDict()  # CaptionModel spec (vtfusion_jax/models/caption.py)
    c.model.width = 128  # token width D
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.attention_impl = "auto"  # auto | xla | cudnn | pallas | reference (fusion; the decoder: xla)
    c.model.scan_layers = False  # nn.scan over the fusion's layers ("fused" memory; not the decoder's)
    c.model.remat_policy = "none"  # the fusion's rematerialisation ("fused" memory; not the decoder's)
    c.model.image_encoder = dict(  # image tower
        name="cnn",  # Santoro et al.'s conv stack
        channels=(32, 64, 128),  # 75 px -> 10x10 = 100 image tokens
        strides=(2, 2, 2),  # conv strides
        norm="group",  # GroupNorm
        pos_emb="learn",  # learned 2-D positions (captions name positions)
        freeze=False,  # True: frozen
    )
    c.model.memory = "image"  # decoder cross-attends to: "image" tokens | "fused" = fusion(prompt, image) outputs
    c.model.prompt_len = 8  # "fused": learned prompt tokens fed to the fusion as its text (models/caption.py says why)
    c.model.fusion = dict(  # "fused" only: the variant making the memory (unused, no parameters, with "image")
        name="co_attention",  # updates both streams (cross / gated_cross / query change only the prompt tokens)
        num_layers=1,  # fusion layers
        num_heads=4,  # heads
        mlp_dim=256,  # MLP width
        dropout_rate=0.0,  # dropout
        freeze=False,  # True: frozen (prompt and fusion)
    )
    c.model.head = dict(  # caption decoder (vocab_size comes from the word vocabulary)
        name="caption_decoder",  # CaptionDecoder
        num_layers=2,  # decoder layers (causal self-attn, cross-attn to the image, MLP)
        num_heads=4,  # heads
        mlp_dim=256,  # MLP width
        max_len=48,  # positions (>= dataset.max_len - 1)
        dropout_rate=0.0,  # MLP dropout
        freeze=False,  # True: frozen
    )

    c.optim = common.optim(
        lr=1e-3,
        warmup_steps=200,
        lr_multipliers=ml_collections.ConfigDict(dict(image_encoder=1.0, fusion=1.0, head=1.0)),  # no text tower
    )
    c.train = common.train(  # the loop (configs/common.py describes every field)
        global_batch_size=64,  # (image, caption) pairs per step
        num_steps=2200,  # ~14 epochs of 9,800 images
        label_smoothing=0.1,  # of the teacher-forced targets
        log_every_steps=100,
        eval_every_steps=550,
        checkpoint_every_steps=550,
        eval_batch_size=200,  # images decoded per call
        progress_bar=False,
    )
    c.eval = common.evaluation(num_attention_maps=0)  # captioning writes no attention maps
    with c.eval.unlocked():
        c.eval.beam_size = 4  # beam search width
        c.eval.length_penalty = 0.6  # GNMT length penalty alpha (0 = raw log-probability)
        c.eval.measure_cache_speedup = True  # also time greedy decoding without the KV cache

    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
