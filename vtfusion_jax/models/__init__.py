"""Small registries: components are chosen by name from plain dicts.

A spec is ``{"name": <registry key>, <module dataclass field>: <value>, ...}``; model-wide settings (``shared``:
width, dtype, attention_impl, scan_layers, remat_policy) fill the fields a module has and the spec leaves unset. An
unknown name or field raises a ValueError listing the valid ones. Fusion variants register themselves
(models/registry.py). The modules named in ``VTFUSION_PLUGINS`` (comma-separated, on ``sys.path``) are imported
here, so their variants are known everywhere without an edit (docs/adding_a_variant.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from vtfusion_jax.models import film, fusion, probe  # noqa: F401  (importing registers their variants)
from vtfusion_jax.models.fusion import FusionBase, FusionOutput  # noqa: F401  (for variants defined elsewhere)
from vtfusion_jax.models.heads import HEADS
from vtfusion_jax.models.registry import FUSIONS, FusionInfo, fusion_info, register_fusion  # noqa: F401
from vtfusion_jax.models.text import TEXT_ENCODERS
from vtfusion_jax.models.vision import IMAGE_ENCODERS

# The frozen-feature probe's parameter-free image encoder (models/probe.py) sits beside the main ones.
_IMAGE_ENCODERS = {**IMAGE_ENCODERS, **probe.PROBE_IMAGE_ENCODERS}

# Spec keys consumed elsewhere (checkpoint import, freezing), never passed to the module.
NON_MODULE_KEYS = ("name", "init_from", "freeze")


def _module_fields(cls: type[nn.Module]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def _build(kind: str, registry: Mapping[str, Any], spec: Mapping[str, Any], shared: Mapping[str, Any], **extra):
    spec = dict(spec)
    name = spec.get("name")
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {sorted(registry)}")
    entry = registry[name]
    cls, defaults = entry if isinstance(entry, tuple) else (getattr(entry, "cls", entry), {})
    fields = _module_fields(cls)
    kwargs = {**defaults, **{k: v for k, v in shared.items() if k in fields}}
    for k, v in spec.items():
        if k in NON_MODULE_KEYS:
            continue
        if k not in fields:
            raise ValueError(f"{kind} {name!r} has no field {k!r}; valid fields: {sorted(fields)}")
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    kwargs.update(extra)
    return cls(**kwargs)


def get_image_encoder(spec: Mapping[str, Any], shared: Mapping[str, Any] = {}) -> nn.Module:  # noqa: B006
    """Builds an image encoder (``cnn``, ``resnet18``, ``resnet50``, ``vit``, ``pixels``) from its spec."""
    return _build("image_encoder", _IMAGE_ENCODERS, spec, shared)


def get_text_encoder(spec: Mapping[str, Any], shared: Mapping[str, Any] = {}) -> nn.Module:  # noqa: B006
    """Builds a text encoder (``bert``, ``gru``) from its spec."""
    return _build("text_encoder", TEXT_ENCODERS, spec, shared)


def get_fusion(spec: Mapping[str, Any], shared: Mapping[str, Any] = {}) -> nn.Module:  # noqa: B006
    """Builds a registered fusion variant (``FUSIONS``) from its spec."""
    return _build("fusion", FUSIONS, spec, shared)


def get_head(spec: Mapping[str, Any], shared: Mapping[str, Any] = {}, **extra) -> nn.Module:  # noqa: B006
    """Builds a task head (``classification``) from its spec; ``extra`` gives data-dependent fields (num_classes)."""
    return _build("head", HEADS, spec, shared, **extra)


for _plugin in filter(None, (m.strip() for m in os.environ.get("VTFUSION_PLUGINS", "").split(","))):
    importlib.import_module(_plugin)  # its @register_fusion lines run now (docs/adding_a_variant.md)
