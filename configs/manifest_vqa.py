"""VQA / image-text classification on your own data: JSON Lines manifests + an image folder, any fusion variant.

Run:
  python train.py --config=configs/manifest_vqa.py:manifest=my_data --workdir=runs/my_vqa
  python eval.py --config=configs/manifest_vqa.py:manifest=my_data --workdir=runs/my_vqa --split=test
  python train.py --config=configs/manifest_vqa.py:manifest=my_data,fusion=co_attention --workdir=runs/my_vqa_co

``my_data`` holds train.jsonl, validation.jsonl (model selection) and optionally test.jsonl, one row per question:
{"image": "images/0001.png", "text": "what colour is the car?", "label": "red", "question_type": "colour"}
(format and rules: docs/data.md, "Manifests"). The answer vocabulary is the train split's labels; eval reports
accuracy per ``question_type``. Rows naming the same image file (after path normalisation) share an image: training
batches hold all the questions of up to ``train.images_per_batch`` images, each image encoded once
(data/grouped.py); when images rarely repeat, set ``--config.train.images_per_batch=0``.

The towers are small and trained from scratch (a 4-layer CNN on 128 px images: 64 image tokens; a 2-layer
Transformer on MiniLM's WordPiece ids): a starting point to scale up, not a tuned model.
"""

import ml_collections
from ml_collections import config_dict

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import parse_arg

common = config_lib.sibling(__file__, "common")


def get_config(arg=None):
    """Returns the locked config; ``arg`` is "manifest=PATH[,fusion=NAME]" (default fusion cross)."""
    arg = parse_arg(arg, manifest="", fusion="cross", accel=False)
    common.fusion_name(arg.fusion)  # a ValueError listing the variants for any other name
    c = ml_collections.ConfigDict()
    c.task = "vqa"  # vqa | retrieval | caption (vtfusion_jax/tasks)
    c.seed = 0  # parameter init, dropout and data order
    c.mesh_shape = (-1, 1, 1)  # devices along ('data', 'fsdp', 'tensor'); -1 = the remaining devices

    c.dataset = ml_collections.ConfigDict()  # what to train on and how inputs are prepared
    c.dataset.name = "manifest"  # TFDS builder over the manifests (vtfusion_jax/data/manifest.py)
    c.dataset.data_dir = config_dict.placeholder(str)  # cache folder; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.dataset.builder_kwargs = ml_collections.ConfigDict(  # manifest builder options
        dict(
            path=arg.manifest,  # folder with train.jsonl, validation.jsonl [, test.jsonl] (or one .jsonl: train)
            image_size=128,  # stored square side in px (bilinear resize, no crop)
            image_dir=config_dict.placeholder(str),  # image paths are relative to it; None = the manifest folder
            skip_bad_rows=False,  # True: skip and count bad rows instead of raising (file:line) errors
        )
    )
    c.dataset.train_split = "train"  # train.jsonl
    c.dataset.val_split = "validation"  # validation.jsonl: model selection
    c.dataset.image_size = config_dict.placeholder(int)  # None = as stored (builder_kwargs.image_size)
    c.dataset.augment = False  # random crops after edge padding (off: answers may name positions)
    c.dataset.max_len = 32  # tokens per question incl. [CLS]/[SEP] (longer ones are truncated)
    c.dataset.tokenizer_path = config_dict.placeholder(str)  # None = MiniLM WordPiece vocab

    c.model = ml_collections.ConfigDict()  # VisionTextModel spec (vtfusion_jax/models): towers chosen by name
    c.model.width = 128  # token width D (shared by every tower)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.attention_impl = "auto"  # auto (GPU: cudnn, TPU: pallas, else xla) | xla | cudnn | pallas | reference
    c.model.scan_layers = False  # nn.scan over layers
    c.model.remat_policy = "none"  # rematerialisation: none | minimal | full
    c.model.image_encoder = dict(  # image tower
        name="cnn",  # cnn | resnet18 | resnet50 | vit
        channels=(32, 64, 128, 128),  # 3x3 conv channels: 128 px -> 8x8 = 64 image tokens
        strides=(2, 2, 2, 2),  # each layer halves the grid
        norm="group",  # GroupNorm: no batch statistics
        pos_emb="learn",  # learned 2-D position embedding
        freeze=False,  # True: frozen
    )
    c.model.text_encoder = dict(  # text tower (vocab_size comes from the tokenizer)
        name="bert",  # bert | gru
        depth=2,  # Transformer layers
        num_heads=4,  # attention heads
        mlp_dim=256,  # MLP width
        max_len=32,  # learned positions (>= dataset.max_len)
        post_ln=False,  # pre-LN blocks + final LayerNorm: stable from scratch
        dropout_rate=0.1,  # dropout inside the text tower
        freeze=False,  # True: frozen
    )
    c.model.fusion = dict(  # how text and image tokens attend to each other
        name=arg.fusion,  # the variant (README "Fusion variants")
        num_layers=2,  # fusion layers (rn: unused)
        num_heads=4,  # heads (rn: unused)
        mlp_dim=256,  # MLP width (rn: width of g and f)
        dropout_rate=0.1,  # dropout inside the fusion
        freeze=False,  # True: frozen
    )
    c.model.head = dict(  # task head
        name="classification",  # answer classifier
        hidden_dim=256,  # hidden width (0 = linear)
        dropout_rate=0.1,  # dropout before each Dense
        freeze=False,  # True: frozen
    )

    c.optim = common.optim(lr=1e-3)  # AdamW, cosine (configs/common.py)
    c.train = common.train(  # the loop (configs/common.py describes every field)
        global_batch_size=64,  # questions per step
        images_per_batch=16,  # image-grouped batches (rows sharing an image path); 0 = one image per question
        num_epochs=10.0,  # passes over the train rows
        eval_every_steps=500,  # validation + checkpoint cadence
        checkpoint_every_steps=500,  # with each validation
    )
    c.eval = common.evaluation()  # eval.py: test split, best checkpoint, 8 attention maps

    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
