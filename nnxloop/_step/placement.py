"""Laying state arrays out on the mesh: each leaf with its sharding (across processes
too), with buffers of its own, and each variable's partition spec checked against the mesh."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _laid_out(x: jax.Array, sharding: NamedSharding) -> bool:
    """Whether `x` already has `sharding`: the same mesh (axis types included: an array on an
    Explicit mesh does not run under an Auto one) and the same layout (P() and P(None) alike)."""
    have = x.sharding
    return have == sharding or (
        isinstance(have, NamedSharding)
        and have.mesh == sharding.mesh
        and have.is_equivalent_to(sharding, x.ndim)
    )


# Copies on the devices the arrays are on (so valid in any mesh context), all in one call.
_copies = jax.jit(lambda xs: [jnp.array(x, copy=True) for x in xs])


def _buffers(x: Any) -> set[int]:
    if isinstance(x, jax.Array):
        return {shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards}
    if isinstance(x, np.ndarray):
        return {x.__array_interface__["data"][0]}
    return set()


def _unshared(moved: jax.Array, source: Any) -> jax.Array:
    """`moved` (just placed from `source`) with no buffer shared with `source`.

    `device_put` keeps the source's buffer for the shard on the device the source is on (a
    replicated layout, even with `may_alias=False`); only such shards are copied, each by a
    device-to-same-device transfer, so nothing is compiled (a jitted copy would compile once
    per leaf shape: seconds of start-up for a model with many).
    """
    source_buffers = _buffers(source)
    shards = moved.addressable_shards
    if not any(s.data.unsafe_buffer_pointer() in source_buffers for s in shards):
        return moved
    pieces = [
        jax.device_put(s.data, s.device, may_alias=False)
        if s.data.unsafe_buffer_pointer() in source_buffers
        else s.data
        for s in shards
    ]
    return jax.make_array_from_single_device_arrays(moved.shape, moved.sharding, pieces)


def _assembled(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` (the same value on every process) laid out with a sharding whose mesh spans
    several processes, built from this process's device pieces, each a buffer of its own.

    `device_put` of a device array to such a sharding is not usable when the process has one
    device: the result's one shard is the array itself with the global sharding, and reading
    its shards fails. So each of this process's devices gets its piece directly: the whole
    array by a device-to-device copy (nothing compiled) where the piece is all of it, a slice
    of one host copy otherwise.
    """
    shape = np.shape(x)
    host = None if isinstance(x, jax.Array) else np.asarray(x)
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        whole = all(
            isinstance(i, slice) and i.indices(n) == (0, n, 1) for i, n in zip(index, shape)
        )
        if whole and host is None:
            pieces.append(jax.device_put(x, device, may_alias=False))
            continue
        if host is None:
            host = np.asarray(x)
        pieces.append(jax.device_put(np.array(host[index]), device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def place_all(
    leaves: list[Any], shardings: list[NamedSharding], *, copy: bool = True
) -> list[jax.Array]:
    """`leaves` laid out with `shardings` (also across processes, also for PRNG keys).

    With `copy`, no result shares a buffer with its leaf: donating the engine's buffers must
    not delete arrays a user still holds. (`device_put(..., may_alias=False)` is not enough:
    over several devices it can still reuse the source buffer for one shard.) Leaves already
    laid out so are copied by one jitted call; a leaf that moves is copied as soon as it has
    moved, so that no more than one moved leaf is held twice at a time.
    """
    out = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    in_place = []
    for i, (x, sharding) in enumerate(zip(out, shardings)):
        if isinstance(x, jax.Array) and _laid_out(x, sharding):
            in_place.append(i)
            continue
        if not sharding.is_fully_addressable:
            out[i] = _assembled(x, sharding)  # a buffer of its own on each device
            continue
        moved = jax.device_put(x, sharding)
        out[i] = _unshared(moved, x) if copy else moved
    if copy and in_place:
        for i, x in zip(in_place, _copies([out[i] for i in in_place])):
            out[i] = x
    return [
        jax.random.wrap_key_data(x, impl=jax.random.key_impl(leaf)) if _is_key(leaf) else x
        for x, leaf in zip(out, leaves)
    ]


def partition_specs(tree: Any, mesh: Mesh) -> list[tuple[str, PartitionSpec]]:
    """`(path, spec)` for each leaf of a state tree, checked against the mesh's axes.

    Raises:
        ValueError: a variable is annotated with an axis the mesh lacks (names it).
    """
    specs = nnx.get_partition_spec(tree)
    spec_leaves = jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    axes = set(mesh.axis_names)
    out = []
    for path, spec in zip(paths, spec_leaves):
        spec = spec or PartitionSpec()
        named = set()
        for entry in spec:
            named.update(entry if isinstance(entry, tuple) else (entry,) if entry else ())
        if named - axes:
            raise ValueError(
                f"Variable {path} is partitioned over mesh axes {sorted(named - axes)}, but the "
                f"Trainer's mesh has axes {mesh.axis_names}. Pass mesh= a mesh with those axes "
                "(and build the model inside `with jax.set_mesh(mesh):`)."
            )
        out.append((path, spec))
    return out
