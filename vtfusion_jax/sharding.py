"""Device mesh, the logical-axis rules table and shardings for the whole train state.

Mesh axes ``('data', 'fsdp', 'tensor')``: data parallelism (parameters replicated); FSDP / ZeRO-3 (batch split, and
parameters and optimiser state sharded on ``embed``, gathered on use); Megatron-style tensor parallelism (heads, MLP
hidden units, conv channels).

``LOGICAL_RULES`` maps the model's logical axis names (layers.py) onto mesh axes. A rule is skipped when its mesh
axis is taken by an earlier dimension (activations ``(batch, length, embed)`` shard only ``batch`` over fsdp); a
dimension the mesh axes do not divide (e.g. 3 RGB channels) stays replicated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes. Order matters: the first rule that can still claim a mesh axis wins.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),  # activations and data: split over every batch-parallel axis
    ("heads", "tensor"),  # attention heads (q/k/v/out kernels, per-head activations)
    ("mlp", "tensor"),  # MLP hidden units, GRU gates
    ("conv_out", "tensor"),  # conv output channels
    ("embed", "fsdp"),  # parameters: FSDP shards the model width; activations keep it whole (batch took fsdp)
    ("vocab", None),  # logits have few classes; embedding tables shard on embed instead
    ("length", None),
    ("kv", None),
    ("conv_in", None),
    ("layers", None),  # stacked axis of scanned layers
)


# Whether model.apply runs inside the rules context, making the model's nn.with_logical_constraint calls on
# activations sharding constraints (every parameter's logical names match its rank: HeadsProjection).
ACTIVATION_CONSTRAINTS = True


def activation_rules():
    """Context for tracing model.apply: the logical-axis rules (see ACTIVATION_CONSTRAINTS) or nothing."""
    return nn.logical_axis_rules(LOGICAL_RULES) if ACTIVATION_CONSTRAINTS else contextlib.nullcontext()


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A jax Mesh over ``MESH_AXES`` with Auto axis types (linen's logical constraints need them).

    ``mesh_shape``: sizes of (data, fsdp, tensor), e.g. (-1, 1, 1); one entry may be -1 (= the remaining devices);
    without -1 and fewer than all ``devices`` (default: all), the first ones.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in mesh_shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {tuple(shape)}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh_shape entry may be -1, got {tuple(shape)}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh_shape {tuple(shape)} does not divide the {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) > len(devices):
        raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, {len(devices)} available")
    if int(np.prod(shape)) < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"mesh_shape {tuple(shape)} must use all {len(devices)} devices of a multi-process job")
        devices = devices[: int(np.prod(shape))]  # e.g. (1, 1, 1): a single-device run on a multi-device host
    if len(devices) == len(jax.devices()):
        try:
            return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
        except TypeError:  # older jax without axis_types (Auto is then the only kind)
            return jax.make_mesh(tuple(shape), MESH_AXES)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_axis_size(mesh: jax.sharding.Mesh, axes: Any) -> int:
    """Number of devices along a mesh axis name, a tuple of names, or None (=1)."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))  # an axis the mesh lacks has size 1


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those dimensions become replicated)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fits = lambda dim, axes: axes is not None and dim % mesh_axis_size(mesh, axes) == 0  # noqa: E731
    return PartitionSpec(*(axes if fits(dim, axes) else None for dim, axes in zip(shape, entries, strict=True)))


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def unbox(tree: Any) -> Any:
    """Strips logical-axis boxes without adding sharding constraints (plain values)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box)


def logical_specs(boxed_tree: Any) -> Any:
    """Tree of logical PartitionSpecs (axis names) for a boxed tree; unboxed leaves get ``PartitionSpec()``."""
    return nn.get_partition_spec(boxed_tree)


def param_shardings(boxed_abstract: Any, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings on ``mesh`` (tree structure of ``unbox(boxed_abstract)``) for a boxed (eval_shape'd) tree of
    ShapeDtypeStructs, following the logical -> mesh ``rules`` and divisibility."""
    specs = nn.logical_to_mesh(logical_specs(boxed_abstract), rules)
    fit = lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh))
    return jax.tree.map(fit, specs, unbox(boxed_abstract), is_leaf=lambda s: isinstance(s, PartitionSpec))


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def optimizer_shardings(abstract_opt_state: Any, abstract_params: Any, p_shardings: Any, mesh) -> Any:
    """Shardings for optimiser state: any leaf whose trailing dict path and shape match a parameter gets that
    parameter's sharding (Adam moments, accumulated gradients); everything else (counts, scalars) is replicated."""
    flat = zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(p_shardings), strict=True)
    by_path = {_dict_keys(path): (x.shape, s) for (path, x), s in flat}
    lengths = sorted({len(k) for k in by_path}, reverse=True)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for n in lengths:
            hit = by_path.get(keys[-n:]) if len(keys) >= n else None
            if hit is not None and tuple(hit[0]) == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Dim 0 split over the batch axes the mesh has, the rest replicated (what the data pipeline produces)."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None))
