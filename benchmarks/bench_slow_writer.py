"""A slow tracker must not slow training: `MetricsLogger` with a writer that sleeps 5 ms per
call, against the same run with no logger, side by side.

    python benchmarks/bench_slow_writer.py [--quick]

The writer runs on its own thread (`nl.writers.BackgroundWriter`), so the steps go on while it
sleeps. Runs are paired back to back and the median of the per-pair ratios reported; an A/A
row (the logger-less run against itself) shows how much of a ratio is the machine's noise.
As wall-time ratios cannot resolve a few percent on a shared machine, the training thread's
own CPU time per step (`time.thread_time`) is measured with and without the logger too: its
difference, as a share of a step's wall time, is what the logger takes from training.
Floor (tracking issue): within 3% of the logger-less run, on 784-256-256-10/b128 logging every
50 steps and on 784-32-32-10/b32 logging every 500 steps.
"""

from __future__ import annotations

import argparse
import functools
import logging
import platform
import statistics
import time

import jax
from bench_step import make_batches, trainer_loop
from common import machine_line, spread

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


def fit(sizes, batches, steps, k, every_steps=None, clock=time.perf_counter):
    """steps/s of `Trainer.fit` (per second of `clock`); with `every_steps`, a
    `MetricsLogger` holding only a `SlowWriter` logs every `every_steps` steps."""
    callbacks = []
    if every_steps is not None:
        callbacks.append(nl.MetricsLogger(every_steps=every_steps, writers=[SlowWriter()]))
    return trainer_loop(sizes, batches, steps, k, callbacks=callbacks, clock=clock)


def training_thread(name, sizes, batches, steps, k, every, repeats):
    """What the logger costs the training thread itself: its CPU time per step
    (`time.thread_time`, which other processes on the machine hardly disturb) with and
    without the logger, the difference as a share of the wall time of a step."""
    plain, logged, wall = [], [], []
    for _ in range(repeats):
        plain.append(1e6 / fit(sizes, batches, steps, k, clock=time.thread_time))
        logged.append(1e6 / fit(sizes, batches, steps, k, every, clock=time.thread_time))
        wall.append(1e6 / fit(sizes, batches, steps, k))
    extra = statistics.median(logged) - statistics.median(plain)
    share = extra / statistics.median(wall)
    print(
        f"  {name:5s} training thread CPU per step: no logger {spread(plain, '.1f')} us, slow "
        f"writer {spread(logged, '.1f')} us; +{extra:.2f} us = {share:.2%} of a "
        f"{statistics.median(wall):.1f} us step"
    )
    return share


def paired(name, no_logger, slow, repeats, labels=("no logger", "slow writer")):
    """`repeats` back-to-back pairs (alternating which runs first, so drift in the machine's
    load hits both alike); prints each variant's steps/s and the median of the per-pair
    ratios, which noise shared by a pair cancels out of."""
    ratios, plain, logged = [], [], []
    for r in range(repeats):
        if r % 2:
            b, a = slow(), no_logger()
        else:
            a, b = no_logger(), slow()
        plain.append(a)
        logged.append(b)
        ratios.append(b / a)
    ratio = statistics.median(ratios)
    print(
        f"  {name:5s} {labels[0]} {spread(plain, '.1f')} steps/s, {labels[1]} "
        f"{spread(logged, '.1f')} steps/s; ratio per pair {spread(ratios)} -> median {ratio:.3f}"
    )
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    configs = [
        (
            "784-256-256-10 b128, log every 50",
            (784, 256, 256, 10),
            128,
            100 if args.quick else 1000,
            50,
        ),
        (
            "784-32-32-10 b32, log every 500",
            (784, 32, 32, 10),
            32,
            200 if args.quick else 10000,
            500,
        ),
    ]
    logging.getLogger("nnxloop.run").setLevel(logging.WARNING)  # no start lines per run
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, python {platform.python_version()}"
    )
    print(machine_line())
    results = {}
    for name, sizes, batch, steps, every in configs:
        batches = make_batches(sizes[0], batch)
        print(f"\n{name} ({steps} steps a run, {repeats} pairs)")
        for k in (1, 8):
            results[(name, k)] = paired(
                f"K={k}",
                functools.partial(fit, sizes, batches, steps, k),
                functools.partial(fit, sizes, batches, steps, k, every),
                repeats,
            )
        # The control: the same run twice, no logger either time. Its spread is the
        # machine's noise, which a ratio above must stand out of to mean anything.
        plain = functools.partial(fit, sizes, batches, steps, 1)
        paired("A/A", plain, plain, repeats, labels=("no logger", "again"))
        for k in (1, 8):
            results[(name, k, "thread")] = training_thread(
                f"K={k}", sizes, batches, steps, k, every, max(3, repeats // 3)
            )
    return results


if __name__ == "__main__":
    main()
