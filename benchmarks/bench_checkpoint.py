"""Checkpointing cost: saves, async saves and restores, against plain NumPy I/O and the disk.

    python benchmarks/bench_checkpoint.py [--quick] [--repeats N] [--dir DIR]

Part 1, for a ~100 MB and a ~1 GB training state (an MLP of wide layers and its Adam moments):
how long a save blocks the training thread with `CheckpointCallback` alone (synchronous) and
with `AsyncSaveCallback`, how long an async save takes until it is on disk, and how long a
restore takes (`load_model`, the model only; a resumed `fit`, model and optimizer), in seconds
and GB/s. Beside them: `np.save` + fsync and `np.load` of the same arrays, and
`dd if=/dev/zero conv=fdatasync` of the same size, the disk's durable-write limit. Restores
and `np.load` read files evicted from the page cache (fsync + POSIX_FADV_DONTNEED).

Part 2: training throughput of a compute-bound MLP (784-2048-2048-10, batch 512) that saves a
checkpoint every 10 s of training, synchronously and asynchronously, as a ratio to no saving.

Targets (checkpointing issue): async blocked time per save <= 10% of a synchronous save;
throughput while saving every 10 s >= 0.9x no saving.

Checkpoints go to a temporary directory under --dir (default: the system's temp directory),
which is deleted at the end.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from bench_step import MLP, loss_fn, make_batches
from common import machine_line, spread, versions_line
from flax import nnx

import nnxloop as nl


class TimedCheckpoint(nl.CheckpointCallback):
    """A `CheckpointCallback` that records how long each periodic save blocks the training
    thread, and how long it takes until it is committed on disk."""

    def __init__(self, directory: str, *, count_first: bool, **trigger):
        super().__init__(directory, max_to_keep=1, resume=False, **trigger)
        self.count_first = count_first  # the first save of a fit may set up orbax's manager
        self.blocked: list[float] = []
        self.on_disk: list[float] = []
        self.waited = 0  # saves that began while the previous one was still being written
        self._watcher: threading.Thread | None = None
        self._first = True

    def on_train_begin(self, trainer) -> None:
        self._first = True
        super().on_train_begin(trainer)

    def _save(self, trainer, *, final: bool = False) -> None:
        if final:  # the save fit makes when it ends is not a periodic one
            super()._save(trainer, final=True)
            return
        # The steps dispatched before the save are training, not saving: let them finish.
        jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
        if self._watcher is not None and self._watcher.is_alive():
            self.waited += 1
        start = time.perf_counter()
        super()._save(trainer)
        skip, self._first = self._first and not self.count_first, False
        if not skip:
            self.blocked.append(time.perf_counter() - start)
        self._watcher = threading.Thread(target=self._watch, args=(start, skip), daemon=True)
        self._watcher.start()

    def _watch(self, start: float, skip: bool) -> None:
        while self.store.is_saving():
            time.sleep(0.002)
        if not skip:
            self.on_disk.append(time.perf_counter() - start)

    def join(self) -> None:
        if self._watcher is not None:
            self._watcher.join()


class TimedResume(nl.CheckpointCallback):
    """A `CheckpointCallback` that records how long restoring the newest checkpoint takes."""

    def on_train_begin(self, trainer) -> None:
        start = time.perf_counter()
        super().on_train_begin(trainer)
        jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
        self.seconds = time.perf_counter() - start


class Stopwatch(nl.Callback):
    """Times a fit's steps after the first `skip` (compilation) up to the end of its last step,
    so the save `fit` makes when it ends is not counted."""

    def __init__(self, skip: int):
        self.skip = skip

    def on_step_end(self, trainer, step, logs) -> None:
        if step in (self.skip, trainer.fit_max_steps):
            jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
            if step == self.skip:
                self.start = time.perf_counter()
            else:
                self.seconds = time.perf_counter() - self.start


@functools.cache
def initial_model(sizes) -> MLP:
    return MLP(sizes, nnx.Rngs(0))


def make_trainer(sizes, callbacks=()):
    return nl.Trainer(
        nnx.clone(initial_model(sizes)),  # initialising 1 GB of weights eagerly takes seconds
        optax.adam(1e-4),
        loss_fn=loss_fn,
        callbacks=list(callbacks),
        progress=False,
    )


def evict(path: str) -> None:
    """Drops the files under `path` from the page cache, so the next read comes from disk."""
    paths = [path] if os.path.isfile(path) else []
    for root, _, names in os.walk(path):
        paths += [os.path.join(root, name) for name in names]
    for name in paths:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- part 1: one state size ---------------------------------------------------------------


def save_run(sizes, batches, *, async_: bool, saves: int, every: int, root: str):
    """Trains with a save every `every` steps; returns the callback and the directory."""
    directory = tempfile.mkdtemp(dir=root)
    checkpoint = TimedCheckpoint(directory, count_first=False, every_steps=every)
    callbacks = [checkpoint, nl.AsyncSaveCallback()] if async_ else [checkpoint]
    trainer = make_trainer(sizes, callbacks)
    trainer.fit(batches, max_steps=(saves + 1) * every)
    checkpoint.join()
    del trainer
    gc.collect()
    return checkpoint, directory


def steps_per_second(sizes, batches) -> float:
    trainer = make_trainer(sizes)
    trainer.fit(batches, max_steps=3)
    jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
    start = time.perf_counter()
    trainer.fit(batches, max_steps=13)
    jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
    return 10 / (time.perf_counter() - start)


def restore_runs(sizes, directory: str) -> tuple[float, float]:
    """Seconds to `load_model` the model, and to restore model + optimizer in a resumed fit."""
    evict(directory)
    start = time.perf_counter()
    model = nl.load_model(directory, lambda: MLP(sizes, nnx.Rngs(0)))
    jax.block_until_ready(nnx.state(model))
    load_seconds = time.perf_counter() - start
    del model
    resume = TimedResume(directory)
    trainer = make_trainer(sizes, [resume])
    evict(directory)
    trainer.fit([], max_steps=resume.store.steps()[-1])  # restored at the end: no steps run
    del trainer
    gc.collect()
    return load_seconds, resume.seconds


def numpy_runs(leaves, path: str) -> tuple[float, float]:
    """Seconds to np.save + fsync the arrays into one file, and to np.load them back."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        for leaf in leaves:
            np.save(f, np.asarray(leaf))
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - start
    evict(path)
    start = time.perf_counter()
    with open(path, "rb") as f:
        loaded = [np.load(f) for _ in leaves]
    read = time.perf_counter() - start
    del loaded
    os.remove(path)
    return write, read


def orbax_uncompressed_run(state, path: str) -> float:
    """Seconds for plain orbax to write the same state with zstd off (orbax's default is on)."""
    checkpointer = ocp.PyTreeCheckpointer(use_compression=False)
    start = time.perf_counter()
    checkpointer.save(path, state)
    seconds = time.perf_counter() - start
    checkpointer.close()
    shutil.rmtree(path)
    return seconds


def dd_run(path: str, megabytes: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={megabytes}", "conv=fdatasync"],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def bench_size(name, sizes, *, saves, gap, repeats, root):
    batches = make_batches(sizes[0], 8)
    # Saves `gap` seconds of training apart, so an async save is written before the next one.
    every = max(2, math.ceil(gap * steps_per_second(sizes, batches)))
    made = make_trainer(sizes)
    state = nnx.state((made.model, made.optimizer))
    leaves = jax.tree.leaves(state)
    total = sum(x.nbytes for x in leaves)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(initial_model(sizes))))
    samples = {key: [] for key in ("sync", "async", "async_disk", "load", "resume", "np_w", "np_r")}
    samples["dd"], samples["orbax_raw"] = [], []
    waited = 0
    for _ in range(repeats):  # interleaved, so drift hits every contender alike
        checkpoint, directory = save_run(
            sizes, batches, async_=False, saves=saves, every=every, root=root
        )
        samples["sync"] += checkpoint.blocked
        load_seconds, resume_seconds = restore_runs(sizes, directory)
        samples["load"].append(load_seconds)
        samples["resume"].append(resume_seconds)
        shutil.rmtree(directory)
        checkpoint, directory = save_run(
            sizes, batches, async_=True, saves=saves, every=every, root=root
        )
        samples["async"] += checkpoint.blocked
        samples["async_disk"] += checkpoint.on_disk
        waited += checkpoint.waited
        shutil.rmtree(directory)
        write, read = numpy_runs(leaves, os.path.join(root, "arrays.npy"))
        samples["np_w"].append(write)
        samples["np_r"].append(read)
        samples["orbax_raw"].append(orbax_uncompressed_run(state, os.path.join(root, "raw")))
        samples["dd"].append(dd_run(os.path.join(root, "zeros"), round(total / 2**20)))
        gc.collect()

    print(
        f"\n{name}: {total / 1e6:.0f} MB state ({model_bytes / 1e6:.0f} MB model), "
        f"{repeats} repeats x {saves} saves, every {every} steps (~{gap:g} s, batch 8), "
        "after a first save per run that is not counted"
    )
    rows = [
        ("sync save, blocked", "sync", total),
        ("async save, blocked", "async", total),
        ("async save, until on disk", "async_disk", total),
        ("np.save + fsync", "np_w", total),
        ("orbax alone, zstd off", "orbax_raw", total),
        ("dd conv=fdatasync", "dd", total),
        ("load_model (model only)", "load", model_bytes),
        ("resumed fit (model + optimizer)", "resume", total),
        ("np.load", "np_r", total),
    ]
    print(f"  {'':32s} {'seconds, median [min-max]':>28s} {'GB/s':>7s}")
    for label, key, nbytes in rows:
        med = statistics.median(samples[key])
        print(f"  {label:32s} {spread(samples[key]):>28s} {nbytes / med / 1e9:7.2f}")
    share = statistics.median(samples["async"]) / statistics.median(samples["sync"])
    print(
        f"  async blocked / sync save: {share:.1%} (target <= 10%: "
        f"{'met' if share <= 0.10 else 'NOT met'})"
    )
    if waited:
        print(f"  note: {waited} async saves waited for the previous one to be written")
    return {"async_share": share, **{k: statistics.median(v) for k, v in samples.items()}}


# -- part 2: throughput while saving ------------------------------------------------------


def throughput_run(sizes, batches, steps, mode, *, every_secs, root):
    """Steps/s of a fit of `steps` steps with no saving, sync saving or async saving."""
    directory = tempfile.mkdtemp(dir=root)
    callbacks = []
    checkpoint = None
    if mode != "none":
        checkpoint = TimedCheckpoint(directory, count_first=True, every_secs=every_secs)
        callbacks = [checkpoint, nl.AsyncSaveCallback()] if mode == "async" else [checkpoint]
    warm = 3  # compile (the time trigger's clock starts before them)
    stopwatch = Stopwatch(warm)
    trainer = make_trainer(sizes, [*callbacks, stopwatch])
    trainer.fit(batches, max_steps=warm + steps)
    saves = 0
    if checkpoint is not None:
        checkpoint.join()
        saves = len(checkpoint.blocked)
    del trainer
    gc.collect()
    shutil.rmtree(directory)
    return steps / stopwatch.seconds, saves, checkpoint


def bench_throughput(name, sizes, batch, *, seconds, every_secs, repeats, root):
    batches = make_batches(sizes[0], batch, n=8)
    rate, _, _ = throughput_run(sizes, batches, 5, "none", every_secs=every_secs, root=root)
    steps = max(10, round(seconds * rate))
    samples = {mode: [] for mode in ("none", "sync", "async")}
    blocked = {"sync": [], "async": []}
    saves = {"sync": [], "async": []}
    for _ in range(repeats):
        for mode in samples:
            value, count, checkpoint = throughput_run(
                sizes, batches, steps, mode, every_secs=every_secs, root=root
            )
            samples[mode].append(value)
            if checkpoint is not None:
                blocked[mode] += checkpoint.blocked
                saves[mode].append(count)
        gc.collect()
    base = statistics.median(samples["none"])
    print(
        f"\nthroughput, {name}: {steps} steps (~{seconds:.0f} s), a save every {every_secs:g} s "
        f"of training, {repeats} repeats"
    )
    ratios = {}
    for mode, values in samples.items():
        med = statistics.median(values)
        ratios[mode] = med / base
        detail = ""
        if mode != "none":
            detail = (
                f"  {statistics.median(saves[mode]):.0f} saves/run, blocked "
                f"{spread(blocked[mode])} s each"
            )
        label = {"none": "no saving", "sync": "sync saving", "async": "async saving"}[mode]
        print(f"  {label:14s} {spread(values, '.2f'):>22s} steps/s {med / base:5.2f}x{detail}")
    print(
        f"  async saving / no saving: {ratios['async']:.2f}x (target >= 0.9x: "
        f"{'met' if ratios['async'] >= 0.9 else 'NOT met'})"
    )
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="~100 MB only, one repeat (smoke)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the temporary checkpoints go")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    print(versions_line("jax", "flax", "orbax-checkpoint", "numpy"))
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, {machine_line()}")
    root = tempfile.mkdtemp(prefix="nnxloop-bench-ckpt-", dir=args.dir)
    print(f"checkpoints under {root}")
    if args.quick:
        print("--quick: a smoke run, too short and too small to judge the targets by")
    # Three adam-state copies of the parameters: ~100 MB = 8.4M params, ~1 GB = 84M params.
    sizes = [
        ("~100 MB", (2048, 2048, 2048, 10), 1 if args.quick else 4, 0.5 if args.quick else 2.5)
    ]
    if not args.quick:
        sizes.append(("~1 GB", (4096,) * 6 + (10,), 3, 8.0))
    if args.quick:
        compute = ("784-256-256-10 b128", (784, 256, 256, 10), 128, 1.0, 0.3)
    else:
        compute = ("784-2048-2048-10 b512", (784, 2048, 2048, 10), 512, 30.0, 10.0)
    results = {}
    try:
        for name, layer_sizes, saves, gap in sizes:
            results[name] = bench_size(
                name, layer_sizes, saves=saves, gap=gap, repeats=repeats, root=root
            )
        name, layer_sizes, batch, seconds, every_secs = compute
        results["throughput"] = bench_throughput(
            name,
            layer_sizes,
            batch,
            seconds=seconds,
            every_secs=every_secs,
            repeats=repeats,
            root=root,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
