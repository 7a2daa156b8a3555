"""Step-engine throughput against a hand-written functional `jax.jit` loop, side by side.

    python benchmarks/bench_step.py [--quick]

Both loops are fed the same list of NumPy batches, which `Trainer.fit` stages on the device (the
default for a list that small); the "unstaged" rows pass each batch from the host instead, as
for data from an iterator. Prints steps/s (median of interleaved repeats, with min-max spread)
and the ratio of each nnxloop configuration to the hand-written loop.
Floors (foundation issue): 784-256-256-10/b128 K=1 >= 0.95x; 784-32-32-10/b32 K=1 >= 0.85x,
K=8 >= 1.20x.
"""

from __future__ import annotations

import argparse
import functools
import platform
import shutil
import tempfile
import time

import jax
import numpy as np
import optax
from common import compare
from flax import nnx

import nnxloop as nl


class MLP(nnx.Module):
    def __init__(self, sizes, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def loss_fn(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_batches(din, batch, n=32):
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.normal(size=(batch, din)).astype(np.float32),
            "y": rng.integers(0, 10, size=(batch,)).astype(np.int32),
        }
        for _ in range(n)
    ]


def hand_written(sizes, batches, steps):
    """The functional NNX loop: split once, jit with donated state, merge inside."""
    model = MLP(sizes, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    def run(n):
        nonlocal state
        loss = None
        for i in range(n):
            state, loss = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, loss))

    run(3)  # compile
    start = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - start)


def trainer_loop(
    sizes, batches, steps, k, logdir=None, stage_data=None, callbacks=(), clock=time.perf_counter
):
    """Steps per second of `clock` (wall time; `time.thread_time` counts this thread's CPU
    only) of `Trainer.fit` over `batches` (a list: staged on the device unless
    `stage_data=False`), with a `MetricsLogger` into `logdir` when given, and `callbacks`."""
    model = MLP(sizes, nnx.Rngs(0))
    callbacks = list(callbacks)
    if logdir is not None and hasattr(nl, "MetricsLogger"):
        callbacks.append(nl.MetricsLogger(logdir, every_steps=50))
    trainer = nl.Trainer(
        model,
        optax.adam(1e-3),
        loss_fn=loss_fn,
        steps_per_dispatch=k,
        callbacks=callbacks,
        progress=False,
        stage_data=stage_data,
    )
    # Ends off a multiple of K, so both the scanned and the single step get compiled here.
    warm = 2 * k * len(batches) + 1
    trainer.fit(batches, max_steps=warm)
    jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
    start = clock()
    trainer.fit(batches, max_steps=warm + steps)
    jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
    return steps / (clock() - start)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    configs = [
        ("784-256-256-10 b128", (784, 256, 256, 10), 128, 100 if args.quick else 600),
        ("784-32-32-10 b32", (784, 32, 32, 10), 32, 200 if args.quick else 3000),
    ]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    logdir = tempfile.mkdtemp()
    results = {}
    for name, sizes, batch, steps in configs:
        batches = make_batches(sizes[0], batch)
        runs = {
            "hand-written jit": functools.partial(hand_written, sizes, batches, steps),
            "nnxloop K=1": functools.partial(trainer_loop, sizes, batches, steps, 1, logdir),
            "nnxloop K=8": functools.partial(trainer_loop, sizes, batches, steps, 8, logdir),
            "K=1 unstaged": functools.partial(
                trainer_loop, sizes, batches, steps, 1, logdir, stage_data=False
            ),
            "K=8 unstaged": functools.partial(
                trainer_loop, sizes, batches, steps, 8, logdir, stage_data=False
            ),
        }
        for label, ratio in compare(
            name, runs, repeats=repeats, steps=steps, base="hand-written jit"
        ).items():
            results[(name, label)] = ratio
    shutil.rmtree(logdir)
    return results


if __name__ == "__main__":
    main()
