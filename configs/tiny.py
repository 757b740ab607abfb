"""Seconds-long smoke runs (tests, debugging): a tiny model on easy-VQA for a few dozen steps.

Run: python train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

import ml_collections
from ml_collections import config_dict

from vtfusion_jax import config_lib
from vtfusion_jax.config_lib import parse_arg

common = config_lib.sibling(__file__, "common")


def get_config(arg=None):
    """Returns the locked tiny config; ``arg`` "accel=1" is the accelerator preset (configs/common.py)."""
    arg = parse_arg(arg, accel=False)
    c = ml_collections.ConfigDict()
    c.task = "vqa"  # vqa | retrieval | caption (vtfusion_jax/tasks)
    c.seed = 0  # parameter init, dropout and data order
    c.mesh_shape = (-1, 1, 1)  # devices along ('data', 'fsdp', 'tensor'); -1 = the remaining devices

    c.dataset = ml_collections.ConfigDict()  # what to train on and how inputs are prepared
    c.dataset.name = "easy_vqa"  # TFDS builder, built on first use from the easy-vqa package (~6 s)
    c.dataset.data_dir = config_dict.placeholder(str)  # TFDS folder; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.dataset.builder_kwargs = ml_collections.ConfigDict()  # builder options (none for easy-VQA)
    c.dataset.train_split = "train"  # training split
    c.dataset.val_split = "validation[:256]"  # a slice keeps validation quick
    c.dataset.image_size = 32  # downsized images: cheap convs
    c.dataset.augment = False  # random crops
    c.dataset.max_len = 16  # tokens per question incl. [CLS]/[SEP]
    c.dataset.tokenizer_path = config_dict.placeholder(str)  # None = MiniLM WordPiece vocab

    c.model = ml_collections.ConfigDict()  # VisionTextModel spec (vtfusion_jax/models): towers chosen by name
    c.model.width = 32  # token width D
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.attention_impl = "auto"  # auto (GPU: cudnn, TPU: pallas, else xla) | xla | cudnn | pallas | reference
    c.model.scan_layers = False  # nn.scan over layers
    c.model.remat_policy = "none"  # rematerialisation: none | minimal | full
    c.model.image_encoder = dict(  # image tower
        name="cnn",  # small conv stack
        channels=(8, 16),  # conv channels: 32 px -> 8x8 tokens
        strides=(2, 2),  # conv strides
        norm="group",  # GroupNorm
        pos_emb="learn",  # learned 2-D positions
        freeze=False,  # True: frozen
    )
    c.model.text_encoder = dict(  # text tower (vocab_size comes from the tokenizer)
        name="bert",  # Transformer text tower
        depth=1,  # layers
        num_heads=4,  # heads (divisible by the tensor axis in the mesh tests)
        mlp_dim=64,  # MLP width
        max_len=16,  # learned positions
        post_ln=False,  # pre-LN
        dropout_rate=0.1,  # dropout (exercises the per-step dropout RNG)
        freeze=False,  # True: frozen
    )
    c.model.fusion = dict(  # how text and image tokens attend to each other
        name="cross",  # text -> image cross-attention
        num_layers=1,  # fusion layers
        num_heads=4,  # heads
        mlp_dim=64,  # MLP width
        dropout_rate=0.0,  # dropout
        freeze=False,  # True: frozen
    )
    c.model.head = dict(  # task head
        name="classification",  # answer classifier
        hidden_dim=32,  # hidden width
        dropout_rate=0.0,  # dropout
        freeze=False,  # True: frozen
    )

    c.optim = common.optim(lr=3e-3, warmup_steps=2, end_lr_factor=0.1)  # a few steps: short warmup, high lr
    c.train = common.train(  # the loop (configs/common.py describes every field)
        global_batch_size=16,  # divisible by the 8 CPU devices of the tests' meshes
        num_steps=12,  # seconds-long runs
        log_every_steps=2,  # every other step
        eval_every_steps=6,  # two validations per run
        checkpoint_every_steps=4,  # several checkpoints per run (resume tests)
        eval_batch_size=64,  # 4 batches of the 256-question validation slice
        progress_bar=False,  # quiet test logs
    )
    c.eval = common.evaluation(split="validation[:256]", num_attention_maps=2)  # quick eval.py

    c.lock()
    return common.accelerator(c, arg.accel)  # accel=1: bfloat16 + fused attention (configs/common.py)
