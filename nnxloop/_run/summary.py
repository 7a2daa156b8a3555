"""What a run says about itself at its start: one line (the model, its size, the devices and
mesh, where checkpoints and logs go) and a table of the parameters per top-level module. The
same per-leaf table goes to TensorBoard as text."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from typing import Any

import jax
from clu import parameter_overview
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from nnxloop._rules.tree_paths import key_parts


def parameter_table(params: nnx.State) -> str:
    """Every parameter with its shape, dtype and size (clu's overview), as text."""
    return parameter_overview.get_parameter_overview(nnx.to_pure_dict(params), include_stats=False)


def count(params: nnx.State) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _layout(spec: Any) -> str:
    if spec is None or all(axis is None for axis in tuple(spec)):
        return "replicated"
    return str(PartitionSpec(*spec))


def module_table(params: nnx.State) -> str:
    """One row per top-level module: its parameter count, dtypes and layouts on the mesh."""
    specs = nnx.get_partition_spec(params)
    spec_leaves = jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )
    rows: dict[str, list[Any]] = collections.OrderedDict()
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0], spec_leaves):
        row = rows.setdefault(key_parts(path)[0], [0, set(), set()])
        row[0] += math.prod(leaf.shape)
        row[1].add(str(leaf.dtype))
        row[2].add(_layout(spec))
    table = [("module", "parameters", "dtype", "layout")] + [
        (name, f"{n:,}", ", ".join(sorted(dtypes)), ", ".join(sorted(layouts)))
        for name, (n, dtypes, layouts) in rows.items()
    ]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i == 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in table
    )


def start_line(
    model_class: type, params: nnx.State, mesh: Mesh, step: int, where: Iterable[str]
) -> str:
    """`Training MLP (12,345 parameters) from step 0 on 4 cpu devices (mesh data=4);
    checkpoints in ...; logs in ...`."""
    devices = mesh.devices.size
    platform = mesh.devices.flat[0].platform
    axes = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    parts = [
        f"Training {model_class.__name__} ({count(params):,} parameters) from step {step} on "
        f"{devices} {platform} device{'s' if devices != 1 else ''} (mesh {axes})",
        *where,
    ]
    return "; ".join(parts)
