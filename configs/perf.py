"""Benchmark sizes for benchmarks/train_step.py, benchmarks/torch_peer.py and benchmarks/gpu_bench.py.

Run: python benchmarks/train_step.py --config=configs/perf.py[:preset=shared,fusion=co_attention,depth=0]
     [--config.model.dtype=bfloat16 ...]

Presets (the ':' argument ``preset``):
  shared  the shared CPU size of issue 8: ViT (patch 8, 64 px -> 64 image tokens) and BERT (16 text tokens) towers
          of 4 layers each, 4 co-attention fusion layers, D=256, float32, batch 32 (~23M parameters).
  gpu     the GPU size: ViT-B/16 at 224 px (197 tokens with CLS), a BERT-base text tower (32 tokens), 6 co-attention
          layers at D=768, bf16 compute with float32 master weights, cuDNN attention, batch 256.
  tiny    seconds-long smoke runs (tests).
``fusion`` swaps the fusion variant; ``depth`` > 0 sets the depth of all three towers (compile-time scaling).

``plain_config(arg)`` returns the same fields as nested plain dicts, so that the benchmark runs where
ml_collections is not installed (the GPU machine); ``get_config(arg)`` wraps them in a locked ConfigDict.
"""

from __future__ import annotations

from vtfusion_jax.config_lib import parse_arg  # stdlib-only: no ml_collections needed

PRESETS = ("shared", "gpu", "tiny")


def _shared() -> dict:
    return dict(
        seed=0,  # parameter init, dropout and the synthetic batch
        mesh_shape=(-1, 1, 1),  # devices along ('data', 'fsdp', 'tensor'); -1 = the remaining devices
        model=dict(  # VisionTextModel spec (vtfusion_jax/models)
            width=256,  # token width D of every tower
            dtype="float32",  # compute dtype: float32 | bfloat16 (params and optimiser state stay float32)
            attention_impl="auto",  # auto (GPU: cudnn, TPU: pallas, else xla) | xla | cudnn | pallas | reference
            scan_layers=False,  # nn.scan over layers (faster compiles; unrolled is a little faster to run on CPU)
            remat_policy="none",  # rematerialisation: none | minimal | full
            text_dedup=0,  # > 0: the text encoder once per distinct question, at most this many a batch
            image_encoder=dict(  # image tower
                name="vit",  # Vision Transformer
                depth=4,  # Transformer layers
                num_heads=4,  # heads (head_dim 64)
                mlp_dim=1024,  # MLP width (4 D)
                patch_size=8,  # 64 px / 8 = 8x8 = 64 image tokens
                pos_emb="learn",  # learned 2-D positions
            ),
            text_encoder=dict(  # text tower
                name="bert",  # BERT-style Transformer
                vocab_size=30522,  # WordPiece vocabulary (BERT / MiniLM uncased)
                depth=4,  # Transformer layers
                num_heads=4,  # heads
                mlp_dim=1024,  # MLP width
                max_len=16,  # learned positions (= text tokens)
                post_ln=False,  # pre-LN blocks + final LayerNorm
            ),
            fusion=dict(  # fusion variant
                name="co_attention",  # text <-> image cross-attention both ways every layer
                num_layers=4,  # fusion layers
                num_heads=4,  # heads
                mlp_dim=1024,  # MLP width
            ),
            head=dict(  # task head
                name="classification",  # answer classifier
                hidden_dim=256,  # hidden width
            ),
        ),
        optim=dict(  # AdamW as in training (vtfusion_jax/optim.py)
            lr=1e-3,  # peak learning rate
            warmup_steps=10,  # linear warmup (updates)
            schedule="cosine",  # cosine | linear | constant
            end_lr_factor=0.01,  # final lr = lr * end_lr_factor
            b1=0.9,  # Adam beta1
            b2=0.999,  # Adam beta2
            eps=1e-8,  # Adam epsilon
            weight_decay=0.01,  # decoupled weight decay (not on biases / norms)
            grad_clip_norm=1.0,  # global-norm clipping (0 = off)
            accum_steps=1,  # micro-batches per update
            lr_multipliers=dict(image_encoder=1.0, text_encoder=1.0, fusion=1.0, head=1.0),  # per-tower lr scale
        ),
        bench=dict(  # what the benchmark feeds and how it times
            batch_size=32,  # global batch (synthetic examples per step)
            images_per_batch=0,  # > 0: image-grouped batches, this many images shared by the batch's questions
            distinct_texts=0,  # > 0: the questions repeat this many distinct texts (model.text_dedup)
            image_size=64,  # image side in pixels
            text_len=16,  # text tokens per example (random lengths >= text_len / 2, padding masked)
            num_classes=13,  # head outputs (easy-VQA answers)
            warmup=3,  # untimed steps after compilation
            steps=20,  # timed steps (median and min reported)
            matmul_size=2048,  # side of the square matmul that measures the peak FLOP/s
            peak_tflops=0.0,  # datasheet peak in TFLOP/s for the second MFU (0 = none)
            compilation_cache_dir="",  # persistent XLA compilation cache ('' = off)
        ),
    )


def plain_config(arg: str | None = None) -> dict:
    """The benchmark config as nested plain dicts (no ml_collections needed)."""
    a = parse_arg(arg, preset="shared", fusion="", depth=0)
    if a.preset not in PRESETS:
        raise ValueError(f"unknown preset {a.preset!r}; valid: {PRESETS}")
    c = _shared()
    m, b = c["model"], c["bench"]
    if a.preset == "gpu":
        m.update(width=768, dtype="bfloat16", attention_impl="cudnn", scan_layers=True)
        m["image_encoder"].update(depth=12, num_heads=12, mlp_dim=3072, patch_size=16, use_cls=True)  # ViT-B/16
        m["text_encoder"].update(depth=12, num_heads=12, mlp_dim=3072, max_len=512, post_ln=True)  # BERT-base
        m["fusion"].update(num_layers=6, num_heads=12, mlp_dim=3072)  # 6 co-attention layers
        m["head"].update(hidden_dim=1536)  # 2x width, as the VQA heads of LXMERT / METER
        b.update(batch_size=256, image_size=224, text_len=32, num_classes=3129)  # VQAv2 answer vocabulary
        b.update(warmup=2, steps=20, matmul_size=8192, peak_tflops=989.0)  # H100/H200 dense bf16 datasheet
    elif a.preset == "tiny":
        m.update(width=32)
        m["image_encoder"].update(depth=1, num_heads=2, mlp_dim=64, patch_size=8)
        m["text_encoder"].update(vocab_size=128, depth=1, num_heads=2, mlp_dim=64)
        m["fusion"].update(num_layers=1, num_heads=2, mlp_dim=64)
        m["head"].update(hidden_dim=32)
        b.update(batch_size=8, image_size=16, text_len=16, warmup=1, steps=2, matmul_size=256)
    if a.fusion:
        m["fusion"]["name"] = a.fusion
    if a.depth > 0:
        m["image_encoder"]["depth"] = m["text_encoder"]["depth"] = m["fusion"]["num_layers"] = a.depth
    return c


def get_config(arg: str | None = None):
    """Returns the locked benchmark config (see the module docstring for ``arg``)."""
    import ml_collections

    c = ml_collections.ConfigDict(plain_config(arg))
    c.lock()
    return c
