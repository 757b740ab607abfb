"""COCO image-text retrieval (Karpathy splits): ITC + ITM on 5 captions per image; recall@1/5/10 in both directions on
the 5k test images x 25k captions (an image query is right when any of its 5 captions is retrieved).

Data (docs/retrieval_captioning.md, "COCO"): one folder with Karpathy's dataset_coco.json and COCO 2014's
train2014/, val2014/; built once into the TFDS data_dir (vtfusion_jax/data/coco.py).
Run: python train.py --config=configs/coco_retrieval.py:coco=/data/coco --workdir=runs/coco_retrieval
     python eval.py --config=configs/coco_retrieval.py:coco=/data/coco --workdir=runs/coco_retrieval --split=test
The model, trained from scratch (init=none): a ViT-B/16 image tower at 224 px, a BERT-base-sized text tower (12
layers, width 768) on a word vocabulary from the training captions, and 6 cross-attention fusion layers for ITM
(ALBEF's fusion depth). init=clip / init=siglip (docs/pretrained.md) starts ITC from a pretrained two-tower model:
     python train.py --config=configs/coco_retrieval.py:coco=/data/coco,init=clip[,init_from=FOLDER] --workdir=runs/r
"""

import ml_collections
from ml_collections import config_dict

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import parse_arg

common = config_lib.sibling(__file__, "common")
INITS = ("none", "clip", "siglip")  # none: every tower from scratch; clip / siglip: both towers + ITC pretrained
# init_from= default per init (a hub id; a local folder with config.json, model.safetensors and tokenizer files)
CHECKPOINTS = dict(clip="openai/clip-vit-base-patch16", siglip="google/siglip-base-patch16-224")


def get_config(arg=None):
    """Returns the locked config; ``arg`` is "coco=PATH[,init=none|clip|siglip[,init_from=FOLDER_OR_HUB_ID]]"."""
    arg = parse_arg(arg, coco="", init="none", init_from="", accel=False)
    if arg.init not in INITS:
        raise ValueError(f"unknown init {arg.init!r}; valid: {INITS}")
    c = ml_collections.ConfigDict()
    c.task = "retrieval"  # vqa | retrieval | caption (vtfusion_jax/tasks)
    c.seed = 0  # parameter init, hard-negative sampling and data order
    c.mesh_shape = (-1, 1, 1)  # devices along ('data', 'fsdp', 'tensor'); -1 = the remaining devices

    c.dataset = ml_collections.ConfigDict()  # images and their captions (vtfusion_jax/data/captions.py)
    c.dataset.name = "coco"  # TFDS builder of vtfusion_jax/data/coco.py (Karpathy splits, restval in train)
    c.dataset.builder_kwargs = ml_collections.ConfigDict(  # COCO builder options
        dict(
            path=arg.coco,  # folder of dataset_coco.json, train2014/, val2014/ ("" = error naming what to pass)
            image_size=224,  # stored square side in px (ViT-B/16: 14 x 14 = 196 image tokens)
            captions_per_image=5,  # the first 5 of each image's captions (5k test: 25,000 captions)
            max_images=0,  # > 0: debugging subset (this many images per split, no split-size check)
        )
    )
    c.dataset.data_dir = config_dict.placeholder(str)  # cache folder; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.dataset.train_split = "train"  # 113,287 images (566k captions)
    c.dataset.val_split = "validation"  # 5,000 images: model selection
    c.dataset.image_size = config_dict.placeholder(int)  # None = as stored (builder_kwargs.image_size)
    c.dataset.augment = True  # random crops after edge padding (data/reader.py)
    c.dataset.max_len = 32  # caption tokens incl. [BOS]/[EOS], longer ones truncated (ALBEF keeps 30 words)

    c.model = ml_collections.ConfigDict()  # RetrievalModel spec (vtfusion_jax/models/retrieval.py)
    c.model.width = 768  # token width D (ViT-B and BERT-base)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.attention_impl = "auto"  # auto (GPU: cudnn, TPU: pallas, else xla) | xla | cudnn | pallas | reference
    c.model.scan_layers = False  # nn.scan over layers
    c.model.remat_policy = "none"  # rematerialisation: none | minimal | full
    c.model.image_encoder = dict(  # image tower: ViT-B/16
        name="vit",  # patch embedding + Transformer layers
        patch_size=16,  # 224 px -> 14 x 14 tokens
        depth=12,  # layers
        num_heads=12,  # heads
        mlp_dim=3072,  # MLP width
        pos_emb="learn",  # learned 2-D positions
        freeze=False,  # True: frozen
    )
    c.model.text_encoder = dict(  # caption tower, BERT-base-sized (vocab_size comes from the word vocabulary)
        name="bert",  # Transformer text tower
        depth=12,  # layers
        num_heads=12,  # heads
        mlp_dim=3072,  # MLP width
        max_len=32,  # learned positions (>= dataset.max_len)
        post_ln=False,  # pre-LN + final LayerNorm
        dropout_rate=0.1,  # dropout
        freeze=False,  # True: frozen
    )
    c.model.fusion = dict(  # ITM: caption tokens attend to themselves and to the image tokens (ALBEF)
        name="cross",  # any registered variant (README "Fusion variants")
        num_layers=6,  # fusion layers (ALBEF's 6)
        num_heads=12,  # heads
        mlp_dim=3072,  # MLP width
        dropout_rate=0.1,  # dropout
        freeze=False,  # True: frozen
    )
    c.model.head = dict(  # ITC projections + temperature + ITM classifier
        name="retrieval",  # RetrievalHead
        embed_dim=256,  # contrastive embedding width E (ALBEF / BLIP)
        init_temperature=0.07,  # tau at init (CLIP / ALBEF)
        min_temperature=0.001,  # tau clip range (ALBEF)
        max_temperature=0.5,  # tau clip range (ALBEF)
        freeze=False,  # True: frozen
    )

    c.loss = ml_collections.ConfigDict()  # loss weights
    c.loss.itc_weight = 1.0  # symmetric InfoNCE over the global batch
    c.loss.itm_weight = 1.0  # matching CE on B positives + 2B hard negatives

    c.optim = common.optim(lr=2e-4, warmup_steps=2000, weight_decay=0.05)  # AdamW, cosine (configs/common.py)
    c.train = common.train(  # the loop (configs/common.py describes every field)
        global_batch_size=256,  # (image, caption) pairs per step = in-batch negatives
        num_steps=22_130,  # 10 epochs of the 566,435 training captions (ALBEF fine-tunes 10)
        log_every_steps=100,  # train metrics cadence
        eval_every_steps=2213,  # every epoch (5k images x 25k captions of validation)
        checkpoint_every_steps=2213,  # with each validation
        eval_batch_size=256,  # evaluation chunk (images, texts or ITM pairs)
        progress_bar=False,  # log lines only
    )
    c.eval = common.evaluation(num_attention_maps=0)  # retrieval writes no attention maps
    with c.eval.unlocked():
        c.eval.rerank_k = 16  # ITC candidates re-ranked by ITM per query (ALBEF / BLIP use 256 on COCO)
        c.eval.rerank_score = "itm+itc"  # candidate score: "itm" log-odds | "itm+itc" log-odds + cos / tau (BLIP)
    if arg.init != "none":  # the towers, their projections / heads and tau (+ SigLIP's bias) from one checkpoint
        src = arg.init_from or CHECKPOINTS[arg.init]
        for tower in ("image_encoder", "text_encoder"):  # architecture from its config.json; text: its tokenizer
            c.model[tower] = ml_collections.ConfigDict(
                dict(
                    init_from=src,  # CLIP / SigLIP two-tower checkpoint (models/retrieval.py, pretrained.py)
                    pooler=True,  # with the pooled-output head: CLIP's projection, SigLIP's pooling head
                    freeze=False,  # fine-tuned
                )
            )
        c.model.head.init_from = src  # tau = exp(-logit_scale) (and SigLIP's logit_bias) from the checkpoint
        c.model.head.tower_embeddings = True  # ITC embeddings = the towers' pooled outputs (no new projection)
        c.model.head.contrastive = "sigmoid" if arg.init == "siglip" else "softmax"  # the checkpoint's own loss
        if arg.init == "siglip":
            c.dataset.max_len = 64  # SigLIP's text length (its pooled token is the last of 64, padding attended)
        c.optim.lr = 1e-5  # fine-tuning rate for the pretrained towers
        c.optim.lr_multipliers.fusion = 10.0  # the fresh ITM fusion and head learn at 1e-4
        c.optim.lr_multipliers.head = 10.0  # (the head's imported tau moves at that rate too)

    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
