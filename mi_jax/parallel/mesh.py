"""The one mesh (`data, fsdp, context, tensor`) and the one rules table.

Model code names axes logically (`embed`, `heads`, `mlp`, `activation_length`, ...); this table
maps them to mesh axes. Changing the parallelism is a config change: pass another `rules` or
another mesh shape, never edit a model.

Note (jax 0.10): `jax.make_mesh` creates Explicit axes by default, under which logical sharding
constraints fail; this module always builds Auto axes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "context", "tensor")

# (logical name, mesh axis or axes or None). First match wins. A logical name may appear only
# once per array (flax refuses duplicates), hence separate names for the kernel axes of convs.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_kv", None),
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("modulation", "tensor"),
    ("kv", None),
    ("text_embed", None),
    ("conv_in", None),
    ("conv_out", None),
    ("conv_kernel", None),  # 1-D convs (Wav2Vec2)
    ("conv_kernel_t", None),
    ("conv_kernel_h", None),
    ("conv_kernel_w", None),
    ("patch_out", None),
    ("audio_in", None),
    ("audio_hidden", None),
    ("audio_embed", None),
)


def parse_mesh_shape(spec: str | Mapping[str, int] | None, num_devices: int | None = None) -> dict[str, int]:
    """`"data=2,fsdp=4"` or a dict -> sizes for all four axes. One axis may be -1 (fill).

    Unnamed axes are 1; with no spec, everything goes to `fsdp`.
    """
    n = num_devices or jax.device_count()
    if spec is None or spec == "":
        sizes = {"fsdp": -1}
    elif isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, _, value = part.partition("=")
            sizes[name.strip()] = int(value)
    else:
        sizes = dict(spec)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; the axes are {MESH_AXES}.")
    full = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in full.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {fill}.")
    known = math.prod(s for s in full.values() if s != -1)
    if fill:
        if n % known:
            raise ValueError(f"mesh: {n} devices cannot be split into {full}.")
        full[fill[0]] = n // known
    if math.prod(full.values()) != n:
        raise ValueError(
            f"mesh: {full} uses {math.prod(full.values())} devices but {n} are present; "
            "make the product of the axis sizes equal the device count (or use -1 for one axis)."
        )
    return full


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A `Mesh` over `devices` (default: all) with axes `data, fsdp, context, tensor` (Auto)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_shape(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware device order where available
        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - fall back to the given order (CPU, odd shapes)
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of (boxed) abstract values carrying logical axis names."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def init_sharded(
    init_fn: Callable[..., Mapping],
    mesh: jax.sharding.Mesh,
    *args,
    rules=DEFAULT_RULES,
    **kwargs,
):
    """Runs `init_fn(*args, **kwargs)` (e.g. `model.init`) so that every parameter is created
    already sharded: `jax.eval_shape` first, shardings from the logical names, then a jitted
    init with `out_shardings`. The full model never lands on one device.

    Returns `(variables, shardings)` with the boxes removed.
    """
    abstract = jax.eval_shape(init_fn, *args, **kwargs)
    shardings = logical_shardings(abstract, mesh, rules)

    def run(*a, **k):
        return nn.unbox(init_fn(*a, **k))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(run, out_shardings=shardings)(*args, **kwargs)
    return variables, shardings


def with_rules(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """Context for tracing sharded steps: the mesh and the logical rules, together."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack
