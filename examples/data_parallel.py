"""Data parallelism (and optionally model parallelism) on 8 fake CPU devices.

    python examples/data_parallel.py [--devices 8] [--model-parallel 2] [--epochs 10]

The same script runs unchanged on a machine with 8 GPUs (drop --devices): nnxloop puts every
device on a `data` axis and shards each batch along it. With --model-parallel N, the mesh is
(devices/N) x N with axes (`data`, `model`), and the hidden layer's weights are split over
`model` by their `nnx.with_partitioning` annotations; the optimizer state follows them.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU only)")
    parser.add_argument("--model-parallel", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workdir", default="runs/data_parallel")
    args = parser.parse_args(argv)
    # Must happen before JAX starts its backend; a no-op on GPU/TPU machines.
    jax.config.update("jax_num_cpu_devices", args.devices)

    import optax
    from flax import nnx

    import nnxloop as nl

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_digits import digits_datasets, loss_fn

    class ShardedMLP(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            init = nnx.initializers.lecun_normal()
            self.dense1 = nnx.Linear(
                64, 256, rngs=rngs, kernel_init=nnx.with_partitioning(init, (None, "model"))
            )
            self.dense2 = nnx.Linear(
                256, 10, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("model", None))
            )

        def __call__(self, x):
            return self.dense2(nnx.relu(self.dense1(x)))

    n = jax.device_count()
    mesh = jax.make_mesh(
        (n // args.model_parallel, args.model_parallel),
        ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    with jax.set_mesh(mesh):  # flax places annotated variables as it creates them
        model = ShardedMLP(rngs=nnx.Rngs(0))
    train, val = digits_datasets(batch_size=64)
    trainer = nl.Trainer(
        model,
        optax.adam(3e-3),
        loss_fn=loss_fn,
        mesh=mesh,
        callbacks=[nl.CheckpointCallback(os.path.join(args.workdir, "ckpt"))],
    )
    trainer.fit(train, val_data=val, epochs=args.epochs)
    metrics = trainer.evaluate(val)
    kernel = trainer.model.dense1.kernel[...]
    print(f"{n} devices, mesh {dict(mesh.shape)}; dense1 kernel sharding {kernel.sharding.spec}")
    print(f"validation accuracy {metrics['accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
