"""The fusion-variant registry: a variant is one module, registered once with what its consumers need.

    @register_fusion("cross", summary="text -> image, then text -> text", paper="ViLBERT ...", pooled=1,
                     attention_maps={"text_to_image": "cross_attn"})
    class CrossFusion(FusionBase): ...

flops.py, viz.py, eval, the configs' variant choices and scripts/fusion_table.py read the entry and nothing else. A
variant outside the package registers the same way (``VTFUSION_PLUGINS``, docs/adding_a_variant.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# Roles an attention map can play (role -> path suffix of a sowing module, e.g. "cross_attn"; read by viz): text ->
# image [B, H, L, N] (image -> text [B, H, N, L]); queries -> image [B, H, Q, N] (text readout [B, H, L, Q]);
# joint self-attention over [text; image]; self-attention over [text; z], [image; z] (z: shared tokens, last).
ATTENTION_ROLES = (
    "text_to_image", "image_to_text", "query_to_image", "text_to_query", "joint", "text_stream", "image_stream"
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FusionInfo:
    """One registered fusion variant.

    Attributes:
      name: the registry key (``model.fusion.name``).
      cls: the flax module; it has ``flops_per_example(text_len, image_len)`` (forward matmul FLOPs).
      summary, paper: one line, what attends to what; the paper(s) it follows.
      pooled: width P of the pooled vector: int k (P = k * width), a function of the built module, or None (traced).
      attention_maps: role (ATTENTION_ROLES) -> path suffix of the attention module that sows it.
      has_gates: the variant has tanh gates ``attn_gate`` (viz.gate_values).
      per_image: its ``__call__`` also takes ``image_index`` and does the question-independent image work once per
        image of an image-grouped batch (models/fusion.py); other variants get the image rows gathered first.
    """

    name: str
    cls: type
    summary: str
    paper: str
    pooled: int | Callable[[Any], int] | None = None
    attention_maps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    has_gates: bool = False
    per_image: bool = False

    @property
    def attention_based(self) -> bool:
        """Whether any of its tokens attends (it declares attention maps)."""
        return bool(self.attention_maps)

    def pooled_width(self, fusion: Any) -> int | None:
        """P for a built module ``fusion`` of this variant, or None when only an abstract evaluation can tell."""
        if callable(self.pooled):
            return self.pooled(fusion)
        return None if self.pooled is None else self.pooled * fusion.width


FUSIONS: dict[str, FusionInfo] = {}


def register_fusion(name: str, *, summary: str, paper: str, **info: Any) -> Callable[[type], type]:
    """Class decorator (returning the class unchanged) registering a fusion variant: FusionInfo's ``name`` (the
    registry key), ``summary`` (what attends to what, one line), ``paper`` and ``**info`` (``pooled``,
    ``attention_maps``, ``has_gates``, ``per_image``)."""

    def register(cls: type) -> type:
        if name in FUSIONS and FUSIONS[name].cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"fusion {name!r} is already registered ({FUSIONS[name].cls.__qualname__})")
        unknown = sorted(set(info.get("attention_maps", {})) - set(ATTENTION_ROLES))
        if unknown:
            raise ValueError(f"fusion {name!r}: unknown attention roles {unknown}; valid: {list(ATTENTION_ROLES)}")
        if not callable(getattr(cls, "flops_per_example", None)):
            raise ValueError(f"fusion {name!r} needs flops_per_example(text_len, image_len)")
        FUSIONS[name] = FusionInfo(name, cls, summary, paper, **info)
        return cls

    return register


def fusion_info(fusion: str | Any) -> FusionInfo:
    """The FusionInfo of a fusion variant, by name or of a built fusion module (an unknown one raises a ValueError
    listing the registered ones)."""
    if not isinstance(fusion, str):
        found = [i for i in FUSIONS.values() if type(fusion) is i.cls]
        if not found:
            raise ValueError(f"{type(fusion).__name__} is not a registered fusion; registered: {list(FUSIONS)}")
        return found[0]
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; valid: {sorted(FUSIONS)}")
    return FUSIONS[fusion]
