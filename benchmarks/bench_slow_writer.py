"""A slow tracker must not slow training: `MetricsLogger` with a writer that sleeps 5 ms per
call, against the same run with no logger, side by side.

    python benchmarks/bench_slow_writer.py [--quick]

The writer runs on its own thread (`nl.writers.BackgroundWriter`), so the steps go on while it
sleeps. Floor (tracking issue): within 3% of the logger-less run, on 784-256-256-10/b128 logging
every 50 steps and on 784-32-32-10/b32 logging every 500 steps.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
from bench_step import make_batches, trainer_loop
from common import compare, machine_line

import nnxloop as nl


class SlowWriter(nl.writers.MetricWriter):
    """A tracker with a 5 ms round trip per call."""

    def __init__(self, delay: float = 0.005):
        self.delay = delay
        self.lines = 0

    def write_scalars(self, step, scalars):
        time.sleep(self.delay)
        self.lines += 1

    def write_hparams(self, hparams):
        time.sleep(self.delay)

    def write_texts(self, step, texts):
        time.sleep(self.delay)


def fit(sizes, batches, steps, k, every_steps=None):
    """steps/s of `Trainer.fit`; with `every_steps`, a `MetricsLogger` holding only a
    `SlowWriter` logs every `every_steps` steps."""
    callbacks = []
    if every_steps is not None:
        callbacks.append(nl.MetricsLogger(every_steps=every_steps, writers=[SlowWriter()]))
    return trainer_loop(sizes, batches, steps, k, callbacks=callbacks)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    configs = [
        (
            "784-256-256-10 b128, log every 50",
            (784, 256, 256, 10),
            128,
            100 if args.quick else 600,
            50,
        ),
        (
            "784-32-32-10 b32, log every 500",
            (784, 32, 32, 10),
            32,
            200 if args.quick else 3000,
            500,
        ),
    ]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, python {platform.python_version()}"
    )
    print(machine_line())
    results = {}
    for name, sizes, batch, steps, every in configs:
        batches = make_batches(sizes[0], batch)
        runs = {}
        for k in (1, 8):
            runs[f"K={k} no logger"] = functools.partial(fit, sizes, batches, steps, k)
            runs[f"K={k} slow writer"] = functools.partial(fit, sizes, batches, steps, k, every)
        samples = compare(name, runs, repeats=repeats, steps=steps, base="K=1 no logger")
        for k in (1, 8):
            ratio = samples[f"K={k} slow writer"] / samples[f"K={k} no logger"]
            results[(name, k)] = ratio
            print(f"  K={k}: slow writer / no logger = {ratio:.3f}")
    return results


if __name__ == "__main__":
    main()
