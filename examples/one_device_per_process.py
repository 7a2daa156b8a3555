"""Data-parallel training with one device per process, the layout of one process per GPU.

Start the same command once per process, with the coordinator and each process's index in the
environment (SLURM's `srun` sets what `nl.distributed.initialize()` needs by itself):

    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
        python examples/one_device_per_process.py --workdir runs/mp &
    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
        python examples/one_device_per_process.py --workdir runs/mp

On CPUs each process has one device; on a GPU machine, give each process its own GPU (e.g.
`CUDA_VISIBLE_DEVICES=<its index>`). Each process reads its own share of every batch of the
digits data from grain, and each process's grain iterator state is saved with the checkpoint:
rerunning the same commands after a stop resumes every process at its own place in the data.
"""

from __future__ import annotations

import argparse
import os

import jax
import optax
from flax import nnx
from train_digits import DigitsMLP, digits_datasets, loss_fn

import nnxloop as nl


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--workdir", default="runs/one_device_per_process")
    args = parser.parse_args(argv)

    nl.distributed.initialize()  # before anything touches a device
    index, count = jax.process_index(), jax.process_count()
    print(
        f"process {index} of {count}: {jax.local_device_count()} local device(s), "
        f"{jax.device_count()} in all",
        flush=True,
    )

    # The same shuffled examples on every process; each takes every `count`-th one.
    train, val = digits_datasets(args.batch_size, share=(index, count))
    trainer = nl.Trainer(
        DigitsMLP(rngs=nnx.Rngs(0)),
        optax.adamw(3e-3),
        loss_fn=loss_fn,
        callbacks=[
            nl.CheckpointCallback(os.path.join(args.workdir, "ckpt"), every_steps=10),
            nl.MetricsLogger(os.path.join(args.workdir, "logs"), every_steps=10),
        ],
    )
    history = trainer.fit(train.to_iter_dataset(), val_data=val, epochs=args.epochs)
    print(f"process {index}: step {trainer.step}, last evaluation {history.evals[-1]}", flush=True)


if __name__ == "__main__":
    main()
