"""Gradient accumulation: what an update of N micro-batches costs, in time and in memory.

    python benchmarks/bench_accumulation.py [--quick]

Time: batches per second with `gradient_accumulation_steps=4` (one update per 4 batches, one
dispatch each) against `steps_per_dispatch=4` (an update per batch, 4 to a dispatch), same
model, same batches, interleaved repeats. Floor (research issue): accumulation at least 0.90x
of K=4 on the small model (784-256-256-10, batches of 128).

Memory: XLA's memory analysis of the compiled step (arguments + outputs - aliased + temporaries)
on a model whose activations outweigh its inputs (64-2048-2048-10, batches of 1024): the step
of 8 micro-batches against the step of one batch. Floor: no more than the one-batch step plus
one gradient-sized accumulator and the 8 input micro-batches, i.e. the activations of only one
micro-batch live at a time.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time

import jax
import optax
from bench_step import MLP, loss_fn, make_batches
from common import compare, machine_line, versions_line
from flax import nnx

import nnxloop as nl


def batches_per_sec(sizes, batches, n_batches, *, k=1, n=1):
    trainer = nl.Trainer(
        MLP(sizes, nnx.Rngs(0)),
        optax.adam(1e-3),
        loss_fn=loss_fn,
        steps_per_dispatch=k,
        gradient_accumulation_steps=n,
        progress=False,
    )
    updates = n_batches // n
    warm = 2 * len(batches) // n  # two epochs: every program compiled
    trainer.fit(batches, max_steps=warm)
    jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
    start = time.perf_counter()
    trainer.fit(batches, max_steps=warm + updates)
    jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
    return updates * n / (time.perf_counter() - start)


def peak_bytes(sizes, batch, n):
    """The compiled step's peak per device, in bytes, and its stats."""
    trainer = nl.Trainer(
        MLP(sizes, nnx.Rngs(0)),
        optax.adam(1e-3),
        loss_fn=loss_fn,
        gradient_accumulation_steps=n,
        progress=False,
    )
    batches = make_batches(sizes[0], batch, n=n)
    m = trainer.step_memory(batches)
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    grads = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))
    )
    inputs = sum(x.nbytes for x in jax.tree.leaves(batches[0]))
    return peak, m.temp_size_in_bytes, grads, inputs


def memory(sizes=(64, 2048, 2048, 10), batch=1024, n=8):
    one, temp_one, grads, inputs = peak_bytes(sizes, batch, 1)
    many, temp_many, _, _ = peak_bytes(sizes, batch, n)
    bound = one + grads + n * inputs
    mb = 2**20
    print(f"\nmemory of the compiled step, {'-'.join(map(str, sizes))} b{batch}, per device")
    print(f"  one batch              peak {one / mb:8.1f} MiB (temporaries {temp_one / mb:.1f})")
    print(
        f"  {n} micro-batches        peak {many / mb:8.1f} MiB (temporaries {temp_many / mb:.1f})"
    )
    print(
        f"  bound: one batch + accumulator {grads / mb:.1f} + {n} inputs {n * inputs / mb:.1f}"
        f" = {bound / mb:.1f} MiB -> {'met' if many <= bound else 'NOT met'}"
    )
    return many, bound


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    logging.getLogger("nnxloop.run").setLevel(logging.WARNING)  # no start lines per run
    print(machine_line())
    print(versions_line("jax", "flax", "optax"), f"on {jax.devices()[0].platform}")
    ratios = {}
    for name, sizes, batch, n_batches in [
        ("784-256-256-10 b128", (784, 256, 256, 10), 128, 80 if args.quick else 800),
        ("784-32-32-10 b32", (784, 32, 32, 10), 32, 200 if args.quick else 4000),
    ]:
        batches = make_batches(sizes[0], batch)
        runs = {
            "K=4": functools.partial(batches_per_sec, sizes, batches, n_batches, k=4),
            "accumulate N=4": functools.partial(batches_per_sec, sizes, batches, n_batches, n=4),
        }
        ratios[name] = compare(
            f"{name}, batches/s", runs, repeats=repeats, steps=n_batches, base="K=4"
        )["accumulate N=4"]
    many, bound = memory()
    return ratios, (many, bound)


if __name__ == "__main__":
    main()
