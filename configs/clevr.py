"""CLEVR VQA from pixels (Johnson et al. 2017), Relation Network setting of Santoro et al. 2017, any fusion variant.

Run (CLEVR prepared first with TFDS, which needs TensorFlow and the network: docs/datasets.md):
  python train.py --config=configs/clevr.py --workdir=runs/clevr_rn
  python eval.py --config=configs/clevr.py --workdir=runs/clevr_rn   # eval.split: validation[1000:]
  python train.py --config=configs/clevr.py:fusion=cross --workdir=runs/clevr_cross   # any registered variant

Data (vtfusion_jax/data/clevr.py): TFDS clevr 3.1.0, one record per question over TFDS's one per image; answer
vocabulary = the train split's 28 answers; question_type = Santoro et al.'s five types (exist, count,
compare_numbers, query_attribute, compare_attribute), derived from the answer and the question's words because
TFDS keeps no question family (the rules: data/clevr.py). The test split has no answers (CLEVR withholds them), so
the validation split (15,000 images, 149,991 questions) is cut by image: the questions of its first 1,000 images
pick the best checkpoint, those of the other 14,000 give the reported figure (the paper's are on the test split).

rn follows the paper's CLEVR-from-pixels model where this codebase has the part: images scaled to 128 x 128, padded
8 px and randomly cropped back (not the paper's +-0.05 rad rotations); 4 conv layers of 24 3x3 kernels, stride 2,
ReLU -> an 8 x 8 grid of 64 objects tagged with their (x, y) (sincos2d_xy); g a 4 x 256 ReLU MLP over all 4,096
ordered pairs with the question; f 256 - 256 - dropout 0.5 - linear to the answers; Adam lr 2.5e-4, batch 64.
Deviations: LayerNorm after each conv, not BatchNorm (no batch statistics here); a one-direction GRU of 128, not an
LSTM (no LSTM text tower), and its tokens' masked mean, not the final state, as the question. The attention variants
share the towers, optimiser and batch; their fusion is 2 layers, 4 heads, MLP 256, and the head a 256-wide MLP.
"""

import ml_collections
from ml_collections import config_dict

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import parse_arg

# rn only (replacing the shared fields): the paper's g (4 x 256) and f (256, 256, then the head's dropout + linear)
RN_EXTRAS = dict(fusion=dict(g_layers=4, f_layers=2, mlp_dim=256, token_pool=1), head=dict(hidden_dim=0, ln=False))

common = config_lib.sibling(__file__, "common")


def get_config(arg=None):
    """Returns the locked config; ``arg`` is "fusion=NAME" (default rn)."""
    arg = parse_arg(arg, fusion="rn", accel=False)
    common.fusion_name(arg.fusion)  # a ValueError listing the variants for any other name
    c = ml_collections.ConfigDict()
    c.task = "vqa"  # vqa | retrieval | caption (vtfusion_jax/tasks)
    c.seed = 0  # parameter init, dropout and data order
    c.mesh_shape = (-1, 1, 1)  # devices along ('data', 'fsdp', 'tensor'); -1 = the remaining devices

    c.dataset = ml_collections.ConfigDict()  # what to train on and how inputs are prepared
    c.dataset.name = "clevr"  # TFDS clevr 3.1.0, one record per question (vtfusion_jax/data/clevr.py)
    c.dataset.data_dir = config_dict.placeholder(str)  # TFDS folder; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.dataset.builder_kwargs = ml_collections.ConfigDict()  # builder options (none for CLEVR)
    c.dataset.train_split = "train"  # 699,989 questions on 70,000 images
    c.dataset.val_split = "validation[:1000]"  # model selection: the questions of the first 1,000 validation images
    c.dataset.image_size = 128  # resized at load (PIL bilinear) from 480 x 320, as the paper
    c.dataset.augment = True  # 8 px edge padding + random 128 px crops (the paper's padding and crops)
    c.dataset.max_len = 64  # tokens per question incl. [CLS]/[SEP] (longer ones are truncated)
    c.dataset.tokenizer_path = config_dict.placeholder(str)  # None = MiniLM WordPiece vocab

    c.model = ml_collections.ConfigDict()  # VisionTextModel spec (vtfusion_jax/models): towers chosen by name
    c.model.width = 128  # token width D (shared by every tower)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.attention_impl = "auto"  # auto (GPU: cudnn, TPU: pallas, else xla) | xla | cudnn | pallas | reference
    c.model.scan_layers = False  # nn.scan over layers
    c.model.remat_policy = "none"  # rematerialisation: none | minimal | full
    c.model.image_encoder = dict(  # image tower
        name="cnn",  # Santoro et al.'s conv stack
        channels=(24, 24, 24, 24),  # 24 kernels per layer: 128 px -> 64 -> 32 -> 16 -> 8x8 = 64 objects
        strides=(2, 2, 2, 2),  # conv strides
        norm="layer",  # LayerNorm over channels (the paper: BatchNorm; GroupNorm's 16-channel groups do not fit 24)
        pos_emb="sincos2d_xy",  # 2-D sin-cos + a linear map of each object's (x, y): the paper's coordinate tags
        freeze=False,  # True: frozen
    )
    c.model.text_encoder = dict(  # text tower (vocab_size comes from the tokenizer)
        name="gru",  # recurrent question encoder (the paper: an LSTM)
        hidden=128,  # state size, as the paper's LSTM
        bidirectional=False,  # one direction, as the paper
        freeze=False,  # True: frozen
    )
    c.model.fusion = dict(  # how text and image tokens attend to each other; RN_EXTRAS applied below for rn
        name=arg.fusion,  # the variant under study
        num_layers=2,  # fusion layers (rn: unused)
        num_heads=4,  # heads (rn: unused)
        mlp_dim=256,  # MLP width (rn: width of g and f)
        dropout_rate=0.0,  # dropout inside the fusion
        freeze=False,  # True: frozen
    )
    c.model.head = dict(  # task head
        name="classification",  # answer classifier
        hidden_dim=256,  # hidden width (rn: 0, f's last layer is the linear map to the answers)
        dropout_rate=0.5,  # dropout before each Dense (rn: the paper's 50 % before the output layer)
        ln=True,  # LayerNorm the pooled vector first (rn: False)
        freeze=False,  # True: frozen
    )
    if arg.fusion == "rn":
        c.model.fusion.update(RN_EXTRAS["fusion"])  # variant-only fields
        c.model.head.update(RN_EXTRAS["head"])  # variant-only fields

    c.optim = common.optim(  # the paper's plain Adam (configs/common.py)
        lr=2.5e-4,  # the paper's learning rate
        warmup_steps=0,  # none
        schedule="constant",  # no decay
        weight_decay=0.0,  # Adam, not AdamW
        grad_clip_norm=0.0,  # no clipping
    )
    c.train = common.train(  # the loop (configs/common.py describes every field)
        global_batch_size=64,  # questions per step, as the paper
        images_per_batch=8,  # image-grouped batches (~10 questions per image): each image encoded once per batch
        num_epochs=20.0,  # passes over the train questions (the paper does not state its length)
        log_every_steps=100,  # train metrics cadence
        eval_every_steps=5000,  # validation on the ~10,000 model-selection questions
        checkpoint_every_steps=5000,  # with each validation
        eval_batch_size=512,  # validation / test batch size
    )
    c.eval = common.evaluation(split="validation[1000:]")  # eval.py: the other 14,000 images (test has no answers)

    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
