"""Batches: checking their shape, placing them on the mesh, stacking them for a dispatch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def default_mesh() -> Mesh:
    """All devices on one `data` axis (auto sharding, so user code needs no annotations)."""
    devices = jax.devices()
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def data_axis_size(mesh: Mesh) -> int:
    return mesh.shape.get(DATA_AXIS, 1)


def batch_size(batch: Any, mesh: Mesh, *, grouped: bool = False) -> int:
    """The leading size shared by every leaf of `batch`, checked against the data axis.

    `grouped`: `batch` is the micro-batches of one accumulated update stacked on a leading
    axis (`[N, b, ...]`); their batch axis is checked and `N * b` returned.

    Raises:
        ValueError: the leaves disagree on their leading size, a leaf has no batch axis, or the
            size does not divide by the number of devices on the mesh's `data` axis.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("A batch has no arrays in it; each batch must be a pytree of arrays.")
    axis = int(grouped)
    shapes = [np.shape(leaf)[axis:] for leaf in leaves]
    size = shapes[0][0] if shapes[0] else None
    if any(not shape or shape[0] != size for shape in shapes):
        _raise_batch_mismatch(batch)
    n = local_data_axis_size(mesh)
    if size % n:
        where = "this process's share of" if jax.process_count() > 1 else "the mesh's"
        raise ValueError(
            f"A batch of size {size} cannot be split over the {n} devices of {where} "
            f"'{DATA_AXIS}' axis; use a batch size that divides by {n} (drop or pad the last "
            "batch)."
        )
    return size * np.shape(leaves[0])[0] if grouped else size


def local_data_axis_size(mesh: Mesh) -> int:
    """Devices along `data` that hold this process's share of a batch."""
    return max(1, data_axis_size(mesh) // jax.process_count())


def _raise_batch_mismatch(batch: Any) -> None:
    sizes = {
        jax.tree_util.keystr(path) or "<batch>": (np.shape(leaf) or ("no batch axis",))[0]
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch)
    }
    listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise ValueError(
        f"The leaves of a batch disagree on the batch size (axis 0): {listing}. Every leaf of a "
        "batch must be an array with the same leading size."
    )


def batch_sharding(mesh: Mesh, *, stacked: bool = False, grouped: bool = False) -> NamedSharding:
    """Sharding of a batch leaf: its batch axis along `data`. That is axis 0, after one
    leading axis when stacked for a scan over steps and one when grouped into the
    micro-batches of an accumulated update."""
    axis = DATA_AXIS if DATA_AXIS in mesh.shape else None
    return NamedSharding(mesh, PartitionSpec(*[None] * (stacked + grouped), axis))


def prepare(batch: Any, mesh: Mesh, *, stacked: bool = False, grouped: bool = False) -> Any:
    """`batch` ready for a jitted call whose batch input is sharded along `data`.

    In one process, NumPy leaves pass through (the call shards them as it copies them in,
    much cheaper than a separate transfer) and device arrays placed differently are moved to
    the batch sharding. With several processes, each passes its share of the batch, and the
    global array is assembled from the shares.
    """
    sharding = batch_sharding(mesh, stacked=stacked, grouped=grouped)
    if jax.process_count() > 1:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
        )
    leaves = jax.tree.leaves(batch)
    if all(not isinstance(x, jax.Array) or x.sharding == sharding for x in leaves):
        return batch
    return jax.device_put(batch, sharding)


def stack(batches: list[Any]) -> Any:
    """Stacks same-structured batches on a new leading axis: on the host for host arrays, on
    the device for JAX arrays (in one process), so device batches never round-trip."""
    return jax.tree.map(_stack_leaves, *batches)


def _stack_leaves(*xs: Any) -> Any:
    if (
        jax.process_count() == 1
        and all(isinstance(x, jax.Array) for x in xs)
        and len({x.sharding for x in xs}) == 1  # jnp.stack needs them placed alike
    ):
        return jnp.stack(xs)
    return np.stack([np.asarray(x) for x in xs])


def concat(outputs: list[Any]) -> Any:
    """Concatenates per-batch outputs on axis 0, on the host (of every process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        host = multihost_utils.process_allgather(outputs, tiled=True)
    else:
        host = jax.device_get(outputs)
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *host)


def skip(iterator: Iterator[Any], count: int) -> int:
    """Advances `iterator` by up to `count` batches; returns how many it skipped."""
    skipped = 0
    for _ in range(count):
        try:
            next(iterator)
        except StopIteration:
            break
        skipped += 1
    return skipped
