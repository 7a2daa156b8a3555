"""Resume cost: time from process start to the first step done, fresh and resumed.

    python benchmarks/bench_resume.py [--quick] [--repeats N] [--dir DIR]

Each measurement starts a new Python process that builds a Trainer with a
`CheckpointCallback` and calls `fit`; the time runs from just before the process is started
to the end of its first training step (its loss read back from the device). Into an empty
directory that is a fresh start (imports, JAX start-up, model initialisation, compilation,
one step); into a directory holding a checkpoint of the same run, the process also restores
model, optimizer and progress before that step. The difference is what resuming costs. The
checkpoint's files are evicted from the page cache before each resumed start, so they are
read from disk. Fresh and resumed starts are interleaved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import machine_line, spread, versions_line

CONFIGS = {  # name: (layer sizes, batch); the state is the parameters plus two Adam moments
    "~100 MB state (784-2048-2048-2048-10)": ((784, 2048, 2048, 2048, 10), 8),
    "~1 MB state (784-256-256-10)": ((784, 256, 256, 10), 32),
}


def child(directory: str, sizes: tuple[int, ...], batch: int, started: float) -> None:
    """Runs in the measured process: fit until the first step is done, print, exit."""
    import jax
    import optax
    from bench_step import MLP, loss_fn, make_batches
    from flax import nnx

    import nnxloop as nl

    class FirstStep(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            float(logs["loss"])  # the step is done
            print(f"first-step {time.time() - started:.4f} step={step}", flush=True)
            sys.stdout.flush()
            os._exit(0)  # like a kill: no save at the end

    trainer = nl.Trainer(
        MLP(sizes, nnx.Rngs(0)),
        optax.adam(1e-4),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(directory, every_steps=1000), FirstStep()],
        progress=False,
    )
    trainer.fit(make_batches(sizes[0], batch, n=4), max_steps=10_000)
    jax.block_until_ready(nnx.state((trainer.model, trainer.optimizer)))
    raise SystemExit("fit ended without a step")


def measure(directory: str, sizes, batch) -> tuple[float, int]:
    started = time.time()
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            directory,
            "--sizes",
            ",".join(map(str, sizes)),
            "--batch",
            str(batch),
            "--started",
            repr(started),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    for line in out.stdout.splitlines():
        if line.startswith("first-step "):
            seconds, step = line.split()[1:]
            return float(seconds), int(step.split("=")[1])
    raise RuntimeError(f"the measured process failed:\n{out.stdout}\n{out.stderr}")


def make_checkpoint(directory: str, sizes, batch) -> None:
    import optax
    from bench_step import MLP, loss_fn, make_batches
    from flax import nnx

    import nnxloop as nl

    trainer = nl.Trainer(
        MLP(sizes, nnx.Rngs(0)),
        optax.adam(1e-4),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(directory, every_steps=1000)],
        progress=False,
    )
    trainer.fit(make_batches(sizes[0], batch, n=4), max_steps=3)  # saved at the end: step 3


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the small model, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the temporary checkpoints go")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sizes = tuple(int(n) for n in args.sizes.split(","))
        child(args.child, sizes, args.batch, args.started)
        return None

    from bench_checkpoint import evict

    repeats = 1 if args.quick else args.repeats
    print(versions_line("jax", "flax", "orbax-checkpoint", "numpy"))
    print(machine_line())
    root = tempfile.mkdtemp(prefix="nnxloop-bench-resume-", dir=args.dir)
    configs = list(CONFIGS.items())[1:] if args.quick else list(CONFIGS.items())
    results = {}
    try:
        for name, (sizes, batch) in configs:
            saved = os.path.join(root, "saved")
            make_checkpoint(saved, sizes, batch)
            fresh, resumed = [], []
            for i in range(repeats):
                empty = os.path.join(root, f"empty-{i}")
                seconds, step = measure(empty, sizes, batch)
                assert step == 1, step
                fresh.append(seconds)
                evict(saved)
                seconds, step = measure(saved, sizes, batch)
                assert step == 4, f"did not resume from step 3 (first step {step})"
                resumed.append(seconds)
            shutil.rmtree(saved)
            cost = statistics.median(resumed) - statistics.median(fresh)
            print(f"\n{name}, {repeats} repeats, process start to first step done, seconds")
            print(f"  fresh start     {spread(fresh):>24s}")
            print(f"  resumed start   {spread(resumed):>24s}")
            print(f"  resuming adds   {cost:24.3f}")
            results[name] = {
                "fresh": statistics.median(fresh),
                "resumed": statistics.median(resumed),
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
