"""Trains ColumnRowMLP on 8 fake CPU devices (data 4 x model 2) and checkpoints it:
`python reshard_run.py WORKDIR`. Writes WORKDIR/params.npz with the final parameters."""

import sys

import jax
from conftest import make_batches  # sets 4 devices; overridden below, before jax starts

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from parallel_models import ColumnRowMLP, loss_fn  # noqa: E402

import nnxloop as nl  # noqa: E402


def main(workdir):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        model = ColumnRowMLP(nnx.Rngs(0))
    trainer = nl.Trainer(
        model,
        optax.adam(1e-2),
        loss_fn=loss_fn,
        mesh=mesh,
        callbacks=[nl.CheckpointCallback(f"{workdir}/ckpt")],
    )
    trainer.fit(make_batches(), max_steps=8)
    leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))]
    np.savez(f"{workdir}/params.npz", *leaves)


if __name__ == "__main__":
    main(sys.argv[1])
