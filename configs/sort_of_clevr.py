"""Sort-of-CLEVR (Santoro et al. 2017), one fusion variant per run: relational vs non-relational questions.

Run: python train.py --config=configs/sort_of_clevr.py:fusion=cross --workdir=runs/soc_cross
     python eval.py --config=configs/sort_of_clevr.py:fusion=cross --workdir=runs/soc_cross --split=test
The ':' argument picks the fusion: any registered variant (README "Fusion variants").

Matched budget: every variant shares the image tower, text tower, head, optimiser, batch (640 questions of 32
images, image-grouped) and number of steps (900, sized so the slowest variant, co_attention, trains in <= 30 min on 2
CPU cores); rows differ only in ``model.fusion``. The towers are small on purpose (a reasoning benchmark on a shared
2-core CPU, not a capacity one): 3 stride-2 convs turn 75 px into a 10x10 grid of 100 image tokens (an 11 px object
spans ~2 cells) with fixed sin-cos 2-D positions plus a learned linear map of each cell's (x, y) (Santoro et al.'s
coordinate channels), D = 64.

Why these choices (cross fusion, sin-cos + (x, y) positions, 32 images per batch): docs/results.md, "Sort-of-CLEVR"
(the explorations behind them are in results/archive/). FUSION_EXTRAS holds the few fields that exist for one variant
only. The table: python scripts/report.py (from results/sort_of_clevr/, written by python scripts/run.py).
"""

import ml_collections
from ml_collections import config_dict

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import parse_arg

# Every registered variant that takes the fusion sizes set below (vtfusion_jax/models/registry.py; not the probe)
# Variant-only fields (they replace the shared ones). rn: g over all 10,000 ordered pairs of the 100 image tokens
# would cost ~12x the cross fusion, so rn pairs the 25 cells of the 2x2-average-pooled 5x5 grid (token_pool=2, the
# grid of Santoro et al.'s own CNN) with g 3 layers of width 64 (the paper: 4 x 256).
FUSION_EXTRAS = {"rn": dict(g_layers=3, f_layers=1, mlp_dim=64, token_pool=2)}


common = config_lib.sibling(__file__, "common")


def get_config(arg=None):
    """Returns the locked config; ``arg`` is "fusion=NAME" (default co_attention)."""
    arg = parse_arg(arg, fusion="co_attention", accel=False)
    common.fusion_name(arg.fusion)  # a ValueError listing the variants for any other name
    c = ml_collections.ConfigDict()
    c.task = "vqa"  # vqa | retrieval | caption (vtfusion_jax/tasks)
    c.seed = 0  # parameter init, dropout, data order and the scenes (dataset.builder_kwargs.seed follows it)
    c.mesh_shape = (-1, 1, 1)  # devices along ('data', 'fsdp', 'tensor'); -1 = the remaining devices

    c.dataset = ml_collections.ConfigDict()  # what to train on and how inputs are prepared
    c.dataset.name = "sort_of_clevr"  # TFDS builder generating the scenes (vtfusion_jax/data/sort_of_clevr.py)
    c.dataset.data_dir = config_dict.placeholder(str)  # TFDS folder; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.dataset.builder_kwargs = ml_collections.ConfigDict(  # generator options
        dict(num_train=9800, num_validation=200, num_test=200)  # images per split (20 questions each)
    )
    c.dataset.builder_kwargs.seed = c.get_ref("seed")  # scene generator seed = c.seed: a seed varies the data too
    c.dataset.train_split = "train"  # 196,000 questions
    c.dataset.val_split = "validation"  # model selection
    c.dataset.image_size = config_dict.placeholder(int)  # None keeps 75 px
    c.dataset.augment = False  # no crops: positions are part of the answers
    c.dataset.max_len = 16  # tokens per question incl. [CLS]/[SEP]
    c.dataset.tokenizer_path = config_dict.placeholder(str)  # None = MiniLM WordPiece vocab

    c.model = ml_collections.ConfigDict()  # VisionTextModel spec (vtfusion_jax/models): towers chosen by name
    c.model.width = 64  # token width D (shared by every tower)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.attention_impl = "auto"  # auto (GPU: cudnn, TPU: pallas, else xla) | xla | cudnn | pallas | reference
    c.model.scan_layers = False  # nn.scan over layers
    c.model.remat_policy = "none"  # rematerialisation: none | minimal | full
    c.model.image_encoder = dict(  # image tower
        name="cnn",  # Santoro et al.'s conv stack
        channels=(32, 64, 128),  # conv channels: 75 px -> 38 -> 19 -> 10x10 = 100 image tokens (7.5 px cells)
        strides=(2, 2, 2),  # conv strides
        norm="group",  # GroupNorm
        pos_emb="sincos2d_xy",  # fixed 2-D sin-cos + a linear map of (x, y): positions readable from step 0
        freeze=False,  # True: frozen
    )
    c.model.text_encoder = dict(  # text tower (vocab_size comes from the tokenizer)
        name="bert",  # Transformer text tower
        depth=1,  # layers (the questions are 6 templates x 6 colours)
        num_heads=4,  # heads
        mlp_dim=128,  # MLP width
        max_len=32,  # learned positions (>= dataset.max_len)
        post_ln=False,  # pre-LN + final LayerNorm
        dropout_rate=0.0,  # dropout
        freeze=False,  # True: frozen
    )
    c.model.fusion = dict(  # how text and image tokens attend to each other; FUSION_EXTRAS[name] applied below
        name=arg.fusion,  # the variant under study
        num_layers=2,  # fusion layers: 2 hops (find the X object, then relate it to the others); rn: unused
        num_heads=4,  # heads (rn: unused)
        mlp_dim=128,  # MLP width (rn: width of g and f)
        dropout_rate=0.0,  # dropout
        freeze=False,  # True: frozen
    )
    c.model.fusion.update(FUSION_EXTRAS.get(arg.fusion, {}))  # variant-only fields
    c.model.head = dict(  # task head
        name="classification",  # answer classifier
        hidden_dim=128,  # hidden width
        dropout_rate=0.0,  # dropout
        freeze=False,  # True: frozen
    )

    c.optim = common.optim(lr=1e-3)  # AdamW, cosine (configs/common.py)
    c.train = common.train(  # the loop (configs/common.py describes every field)
        global_batch_size=640,  # questions per micro-step (= 32 images x 20 questions)
        images_per_batch=32,  # image-grouped batches (data/grouped.py): each image encoded once per batch
        eval_batch_size=640,  # validation / test batches: 32 images x 20 questions,
        eval_images_per_batch=32,  # grouped by image as in training
        num_epochs=10.0,  # unused: num_steps > 0
        num_steps=900,  # the matched budget of the variant comparison (576,000 questions, ~2.9 epochs)
        log_every_steps=50,  # train metrics cadence
        eval_every_steps=150,  # the points of the accuracy-vs-time curve
        checkpoint_every_steps=150,  # with each validation
        progress_bar=False,  # run logs stay readable
    )
    c.eval = common.evaluation()  # eval.py: test split, best checkpoint, 8 attention maps

    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
