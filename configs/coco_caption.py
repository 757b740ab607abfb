"""COCO captioning (Karpathy splits): ViT image tokens + a Transformer decoder with cross-attention; BLEU-4 and
CIDEr-D of greedy and beam-search captions against each test image's 5 reference captions.

Data (docs/retrieval_captioning.md, "COCO"): one folder with Karpathy's dataset_coco.json and COCO 2014's
train2014/, val2014/; built once into the TFDS data_dir (vtfusion_jax/data/coco.py).
Run: python train.py --config=configs/coco_caption.py:coco=/data/coco --workdir=runs/coco_caption
     python eval.py --config=configs/coco_caption.py:coco=/data/coco --workdir=runs/coco_caption --split=test
The model, trained from scratch: a ViT-B/16 image tower at 224 px and a 6-layer decoder of width 768 (12 heads)
on a word vocabulary from the training captions.
"""

import ml_collections
from ml_collections import config_dict

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import parse_arg

common = config_lib.sibling(__file__, "common")


def get_config(arg=None):
    """Returns the locked config; ``arg`` is "coco=PATH"."""
    arg = parse_arg(arg, coco="", accel=False)
    c = ml_collections.ConfigDict()
    c.task = "caption"  # vqa | retrieval | caption (vtfusion_jax/tasks)
    c.seed = 0  # parameter init, dropout and data order
    c.mesh_shape = (-1, 1, 1)  # devices along ('data', 'fsdp', 'tensor'); -1 = the remaining devices

    c.dataset = ml_collections.ConfigDict()  # images and their captions (vtfusion_jax/data/captions.py)
    c.dataset.name = "coco"  # TFDS builder of vtfusion_jax/data/coco.py (Karpathy splits, restval in train)
    c.dataset.builder_kwargs = ml_collections.ConfigDict(  # COCO builder options (the retrieval config's build)
        dict(
            path=arg.coco,  # folder of dataset_coco.json, train2014/, val2014/ ("" = error naming what to pass)
            image_size=224,  # stored square side in px (ViT-B/16: 14 x 14 = 196 image tokens)
            captions_per_image=5,  # the first 5 of each image's captions: training pairs and eval references
            max_images=0,  # > 0: debugging subset (this many images per split, no split-size check)
        )
    )
    c.dataset.data_dir = config_dict.placeholder(str)  # cache folder; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.dataset.train_split = "train"  # 113,287 images (566k captions)
    c.dataset.val_split = "validation"  # 5,000 images: model selection (greedy CIDEr-D)
    c.dataset.image_size = config_dict.placeholder(int)  # None = as stored (builder_kwargs.image_size)
    c.dataset.augment = True  # random crops after edge padding (data/reader.py)
    c.dataset.max_len = 32  # caption tokens incl. [BOS]/[EOS], longer ones truncated

    c.model = ml_collections.ConfigDict()  # CaptionModel spec (vtfusion_jax/models/caption.py)
    c.model.width = 768  # token width D (ViT-B)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.attention_impl = "auto"  # auto | xla | cudnn | pallas | reference (fusion; the decoder: xla)
    c.model.scan_layers = False  # nn.scan over the fusion's layers ("fused" memory; not the decoder's)
    c.model.remat_policy = "none"  # the fusion's rematerialisation ("fused" memory; not the decoder's)
    c.model.image_encoder = dict(  # image tower: ViT-B/16
        name="vit",  # patch embedding + Transformer layers
        patch_size=16,  # 224 px -> 14 x 14 tokens
        depth=12,  # layers
        num_heads=12,  # heads
        mlp_dim=3072,  # MLP width
        pos_emb="learn",  # learned 2-D positions
        freeze=False,  # True: frozen
    )
    c.model.memory = "image"  # decoder cross-attends to: "image" tokens | "fused" = fusion(prompt, image) outputs
    c.model.prompt_len = 8  # "fused": learned prompt tokens fed to the fusion as its text (models/caption.py)
    c.model.fusion = dict(  # "fused" only: the variant making the memory (unused, no parameters, with "image")
        name="co_attention",  # updates both streams
        num_layers=1,  # fusion layers
        num_heads=12,  # heads
        mlp_dim=3072,  # MLP width
        dropout_rate=0.1,  # dropout
        freeze=False,  # True: frozen (prompt and fusion)
    )
    c.model.head = dict(  # caption decoder (vocab_size comes from the word vocabulary)
        name="caption_decoder",  # CaptionDecoder
        num_layers=6,  # decoder layers (causal self-attn, cross-attn to the image, MLP)
        num_heads=12,  # heads
        mlp_dim=3072,  # MLP width
        max_len=32,  # positions (>= dataset.max_len - 1)
        dropout_rate=0.1,  # MLP dropout
        freeze=False,  # True: frozen
    )

    c.optim = common.optim(  # AdamW, cosine (configs/common.py)
        lr=2e-4,  # peak learning rate
        warmup_steps=2000,  # linear warmup
        weight_decay=0.05,  # decoupled weight decay
        lr_multipliers=ml_collections.ConfigDict(dict(image_encoder=1.0, fusion=1.0, head=1.0)),  # no text tower
    )
    c.train = common.train(  # the loop (configs/common.py describes every field)
        global_batch_size=256,  # (image, caption) pairs per step
        num_steps=22_130,  # 10 epochs of the 566,435 training captions
        label_smoothing=0.1,  # of the teacher-forced targets
        log_every_steps=100,  # train metrics cadence
        eval_every_steps=2213,  # every epoch (greedy decoding of the 5k validation images)
        checkpoint_every_steps=2213,  # with each validation
        eval_batch_size=256,  # images decoded per call
        progress_bar=False,  # log lines only
    )
    c.eval = common.evaluation(num_attention_maps=0)  # captioning writes no attention maps
    with c.eval.unlocked():
        c.eval.beam_size = 3  # beam search width (BLIP's 3)
        c.eval.length_penalty = 0.6  # GNMT length penalty alpha (0 = raw log-probability)
        c.eval.measure_cache_speedup = False  # True: also time greedy decoding of the split without the KV cache

    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
