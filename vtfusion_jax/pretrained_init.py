"""``model.<tower>.init_from``: towers whose architecture and weights come from a checkpoint (docs/pretrained.md).

    config.model.text_encoder = {init_from: "minilm" | folder | hub id, freeze: bool, <optional overrides>}
      ─► resolve_model_spec: the checkpoint's spec (pretrained.py) + the tower's own fields
      ─► train_lib builds and initialises the whole model as usual
      ─► import_into_state, fresh runs only: the tower's params <- the converted checkpoint, shape-checked per path,
         placed on the state's parameter shardings
      ─► image_normalization: the image checkpoint's pixel mean / std for the input pipeline

Likewise ``model.image_encoder`` (ViT, CLIP / SigLIP vision, ResNet). Fields beside ``init_from`` / ``freeze`` are
loader overrides (pretrained.load_*_encoder; ``pooler: True`` adds the checkpoint's pooled-output head), never a
silent architecture change; a ``name`` that differs from the checkpoint's family raises. ``model.head.init_from``
(a CLIP / SigLIP two-tower file, retrieval head) imports the contrastive temperature tau = exp(-logit_scale) into
``log_temperature`` and SigLIP's ``logit_bias``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vtfusion_jax import pretrained
from vtfusion_jax.models import NON_MODULE_KEYS

TOWERS = {"text_encoder": (pretrained.TEXT_FAMILIES, "text"), "image_encoder": (pretrained.IMAGE_FAMILIES, "image")}
# The input pipeline's normalisation when no image checkpoint says otherwise (data/pipeline.py's defaults).
DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def init_source(tower_spec: Mapping[str, Any]) -> str | None:
    """A tower (or head) spec's ``init_from``, or None."""
    # Tower specs are open dicts of module fields: a tower without the key simply has no checkpoint.
    src = tower_spec.get("init_from")
    return str(src) if src else None


def _overrides(tower_spec: Mapping[str, Any]) -> dict[str, Any]:
    """Loader overrides: the tower's fields except name / init_from / freeze (and the tokenizer's vocab_size)."""
    skip = set(NON_MODULE_KEYS) | {"vocab_size"}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in tower_spec.items() if k not in skip}


def checkpoint_spec(tower: str, tower_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The module spec {name, <architecture fields from config.json>, <overrides>, init_from, freeze?} of a tower with
    ``init_from``, from the checkpoint's config.json alone (no tensors read). ValueError for an unsupported
    model_type, a ``name`` not the checkpoint's family, or (text) another vocab size."""
    families, src = TOWERS[tower][0], init_source(tower_spec)
    _, family, plan = pretrained.family_plan(pretrained.resolve(src), families, f"model.{tower}.init_from={src!r}")
    base = plan.spec
    name = tower_spec.get("name")
    if name is not None and name != base["name"]:
        raise ValueError(
            f"model.{tower}.name={name!r} but init_from={src!r} is a {family} checkpoint that builds {base['name']!r}; "
            f"drop the name (the architecture comes from the checkpoint) or set it to {base['name']!r}"
        )
    vocab = tower_spec.get("vocab_size")
    if vocab is not None and "vocab_size" in base and int(vocab) != int(base["vocab_size"]):
        raise ValueError(
            f"model.{tower}.init_from={src!r} has vocab_size {base['vocab_size']} but the tokenizer has {vocab}: "
            f"set dataset.tokenizer_path to the checkpoint's vocabulary"
        )
    spec = {**plan.spec_with(_overrides(tower_spec)), "init_from": src}
    if "freeze" in tower_spec:
        spec["freeze"] = tower_spec["freeze"]
    return spec


def resolve_model_spec(model_spec: Mapping[str, Any]) -> dict[str, Any]:
    """``config.model`` as a dict with each ``init_from`` tower replaced by ``checkpoint_spec`` (others unchanged)."""
    out = dict(model_spec)
    for tower in TOWERS:
        if tower in out and init_source(out[tower]):
            out[tower] = checkpoint_spec(tower, out[tower])
    return out


def import_into_params(
    params: Mapping[str, Any], param_shardings: Mapping[str, Any], model_spec: Mapping[str, Any], image_size: int, rng
) -> dict[str, Any]:
    """Replaces the params subtree of every ``init_from`` tower by the converted checkpoint; returns the new tree
    (other towers unchanged, same object). ValueError names an imported tensor whose shape differs, or a checkpoint
    whose derived spec differs.

    Args:
      params, param_shardings: the initialised {tower: subtree} (unboxed global jax.Arrays) and its shardings.
      model_spec: the resolved model spec (``resolve_model_spec``; ``VisionTextModel.model_config``).
      image_size: the side of the images the model is fed (ViT / CLIP position embeddings depend on it).
      rng: PRNG key; initialises parameters an override adds that the checkpoint lacks (e.g. ResNet ``project=True``).
    """
    out = dict(params)
    for i, (tower, (_, kind)) in enumerate(TOWERS.items()):
        spec = model_spec.get(tower, {})
        if not init_source(spec):
            continue
        kw = dict(image_size=image_size) if kind == "image" else {}
        load = pretrained.load_image_encoder if kind == "image" else pretrained.load_text_encoder
        loaded_spec, imported = load(spec["init_from"], **kw, rng=jax.random.fold_in(rng, i), **_overrides(spec))
        module = lambda s: {k: v for k, v in s.items() if k not in NON_MODULE_KEYS or k == "name"}  # noqa: E731
        if module(loaded_spec) != module(spec):
            raise ValueError(
                f"model.{tower}.init_from={spec['init_from']!r}: checkpoint spec {module(loaded_spec)} differs from "
                f"the model's {module(spec)}"
            )
        want = traverse_util.flatten_dict(params[tower], sep="/")
        got = traverse_util.flatten_dict(imported, sep="/")
        problems = [f"{tower}/{k}: missing from the checkpoint" for k in sorted(set(want) - set(got))]
        problems += [f"{tower}/{k}: not in the model" for k in sorted(set(got) - set(want))]
        problems += [
            f"{tower}/{k}: checkpoint shape {tuple(got[k].shape)}, model shape {tuple(want[k].shape)}"
            for k in sorted(set(want) & set(got))
            if tuple(got[k].shape) != tuple(want[k].shape) or np.dtype(got[k].dtype) != np.dtype(want[k].dtype)
        ]
        if problems:
            raise ValueError(
                f"model.{tower}.init_from={spec['init_from']!r} does not fit the model's parameters "
                f"(image_size={image_size}):\n  " + "\n  ".join(problems)
            )
        out[tower] = jax.device_put(imported, param_shardings[tower])
    src = init_source(model_spec.get("head", {}))
    if src:
        out["head"] = jax.device_put(_head_params(params["head"], src), param_shardings["head"])
    return out


def _head_params(head: Mapping[str, Any], src: str) -> dict[str, Any]:
    """The head's params with log_temperature = -logit_scale (and logit_bias) from checkpoint ``src``."""
    scale, bias = pretrained.load_logit_scale(src)
    if "log_temperature" not in head or ("logit_bias" in head) != (bias is not None):
        have = "a logit_bias" if bias is not None else "no logit_bias"
        raise ValueError(
            f"model.head.init_from={src!r} ({have}) needs a retrieval head with log_temperature and, exactly when the "
            f"checkpoint has a bias, contrastive='sigmoid'; the head has {sorted(head)}"
        )
    new = {"log_temperature": np.float32(-scale)} | ({"logit_bias": np.float32(bias)} if bias is not None else {})
    return dict(head) | {k: np.asarray(v, head[k].dtype) for k, v in new.items()}


def import_into_state(state: Any, state_shardings: Any, model_spec: Mapping[str, Any], image_size: int, seed: int):
    """A fresh train state with its ``init_from`` towers imported (AdamW's zero moments need no change)."""
    if not any(init_source(model_spec.get(t, {})) for t in (*TOWERS, "head")):
        return state
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 2)  # 0: params, 1: the state's RNG (train_lib)
    params = import_into_params(state.params, state_shardings.params, model_spec, image_size, rng)
    return state.replace(params=params)


def image_normalization(model_spec: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
    """{"image_mean", "image_std"} for the input pipeline: the image checkpoint's statistics
    (pretrained.image_preprocessing) when ``model.image_encoder.init_from`` is set, else the pipeline's defaults."""
    src = init_source(model_spec.get("image_encoder", {}))
    if not src:
        return {"image_mean": DEFAULT_IMAGE_MEAN, "image_std": DEFAULT_IMAGE_STD}
    pre = pretrained.image_preprocessing(src)
    return {"image_mean": tuple(float(x) for x in pre["mean"]), "image_std": tuple(float(x) for x in pre["std"])}
