"""Seconds-long smoke runs (tests, debugging): a tiny model on easy-VQA for a few dozen steps.

Run: python train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    """Returns the locked tiny config (``arg`` is unused)."""
    del arg
    c = ml_collections.ConfigDict()
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
    c.model.attention_impl = "xla"  # dot_product_attention implementation
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

    c.optim = ml_collections.ConfigDict()  # AdamW + schedule (vtfusion_jax/optim.py)
    c.optim.lr = 3e-3  # peak learning rate
    c.optim.warmup_steps = 2  # linear warmup (updates)
    c.optim.schedule = "cosine"  # cosine | linear | constant
    c.optim.end_lr_factor = 0.1  # final lr = lr * end_lr_factor
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.01  # decoupled weight decay (not on biases / norms)
    c.optim.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
    c.optim.accum_steps = 1  # micro-batches per update
    c.optim.lr_multipliers = ml_collections.ConfigDict(  # per-tower learning-rate scale
        dict(image_encoder=1.0, text_encoder=1.0, fusion=1.0, head=1.0)  # per-tower lr scale
    )

    c.train = ml_collections.ConfigDict()  # loop, logging and checkpointing (vtfusion_jax/train_lib.py)
    c.train.global_batch_size = 16  # examples per micro-step (divisible by the batch mesh axes)
    c.train.images_per_batch = 0  # > 0: image-grouped batches (data/grouped.py), each image encoded once per batch
    c.train.num_epochs = 1.0  # used only when num_steps <= 0
    c.train.num_steps = 12  # micro-steps
    c.train.label_smoothing = 0.0  # label smoothing
    c.train.focal_gamma = 0.0  # focal-loss exponent: (1 - p)^gamma down-weights examples already right (0 = plain CE)
    c.train.log_every_steps = 2  # train metrics cadence
    c.train.eval_every_steps = 6  # validation + checkpoint cadence (0 = only at the end, -1 = never)
    c.train.checkpoint_every_steps = 4  # periodic checkpoints
    c.train.keep_checkpoints = 2  # newest kept (+ best)
    c.train.steps_per_run = 0  # stop with a checkpoint after this many steps in one process (0 = no limit)
    c.train.early_stopping_patience = 0  # 0 = off
    c.train.nan_policy = "stop"  # non-finite loss: "stop" (names the step) | "skip" the update (train/skipped)
    c.train.eval_batch_size = 64  # validation batch size
    c.train.prefetch = 2  # batches prepared ahead
    c.train.data_workers = 0  # grain worker processes
    c.train.progress_bar = False  # tqdm bar

    c.eval = ml_collections.ConfigDict()  # eval.py defaults
    c.eval.split = "validation[:256]"  # default split of eval.py
    c.eval.checkpoint = "best"  # best | latest | step
    c.eval.num_attention_maps = 2  # attention-map PNGs

    c.lock()
    return c
