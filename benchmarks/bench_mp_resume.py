"""Resuming a 2-process run: cost against how many batches it had consumed.

    python benchmarks/bench_mp_resume.py [--quick] [--repeats N] [--consumed 200,20000] [--dir DIR]

Two processes on 127.0.0.1 (one CPU device each, gloo collectives) train a small MLP on
grain data, each process reading its own share of every batch. For each number of consumed
batches N, one run trains N steps and checkpoints; then each repeat starts both processes
afresh on a copy of that checkpoint and times process start to the end of the first step
after the resume (the later of the two processes). Two ways back to the data position:

- `saved state`: each process restores its own grain iterator state from the checkpoint
  (its file of the `data` item), O(1) in N;
- `replay`: the same data through an iterator with no `get_state`, so each process reads
  and drops the N batches it had consumed (what every multi-process resume did before).

Floor: with saved state, resuming after 20,000 consumed batches takes no longer than after
200, within 10%. Resumes are interleaved across N and modes so drift hits all alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import machine_line, spread, versions_line

EXAMPLES_PER_PROCESS = 8  # per batch
MODES = ("saved state", "replay")
FLOOR = 1.10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(process_id: int, port: str, directory: str, steps: int, mode: str, started: float):
    """One process: train until `steps` (resuming from `directory`), printing the time of the
    first step it runs; with `started`, exit right after that step (no save)."""
    import grain
    import jax

    jax.config.update("jax_num_cpu_devices", 1)
    import numpy as np
    import optax
    from bench_step import MLP, loss_fn
    from flax import nnx

    import nnxloop as nl

    nl.distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=120)
    batches = steps + 1  # one epoch holds every step
    rng = np.random.default_rng(0)
    n = batches * 2 * EXAMPLES_PER_PROCESS
    x = rng.normal(size=(n, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    data = (
        grain.MapDataset.range(n)[process_id::2]
        .map(lambda i: {"x": x[i], "y": y[i]})
        .batch(EXAMPLES_PER_PROCESS, drop_remainder=True)
    )

    class NoState:
        """The same batches through an iterator without get_state/set_state."""

        def __iter__(self):
            inner = iter(data.to_iter_dataset())
            return (batch for batch in inner)

    class FirstStep(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            float(logs["loss"])  # the step is done
            print(f"first-step {time.time() - started:.4f} step={step}", flush=True)
            os._exit(0)  # like a kill: no save at the end

    callbacks: list[nl.Callback] = [nl.CheckpointCallback(directory, every_steps=steps)]
    if started:
        callbacks.append(FirstStep())
    trainer = nl.Trainer(
        MLP((16, 32, 2), nnx.Rngs(0)),
        optax.adam(1e-3),
        loss_fn=loss_fn,
        steps_per_dispatch=8,
        callbacks=callbacks,
        progress=False,
    )
    train = data.to_iter_dataset() if mode == "saved state" else NoState()
    trainer.fit(train, max_steps=steps + 1 if started else steps)
    print(f"trained {trainer.step}", flush=True)


def launch(directory: str, steps: int, mode: str, *, timed: bool) -> list[str]:
    """Both processes of one run; their outputs. `timed`: a resume timed to its first step."""
    port, started = _free_port(), time.time()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                str(i),
                str(port),
                directory,
                str(steps),
                mode,
                repr(started if timed else 0.0),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=900)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    return outs


def first_step(outs: list[str], steps: int) -> float:
    """The later process's time to its first step after resuming at `steps`."""
    times = []
    for out in outs:
        lines = [line for line in out.splitlines() if line.startswith("first-step ")]
        if not lines:
            raise RuntimeError(f"a measured process failed:\n{out[-3000:]}")
        seconds, step = lines[0].split()[1:]
        if int(step.split("=")[1]) != steps + 1:
            raise RuntimeError(f"did not resume at step {steps}: {lines[0]}")
        times.append(float(seconds))
    return max(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 and 200 batches, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--consumed", default="200,20000", help="comma-separated batch counts")
    parser.add_argument("--dir", default=None, help="where the temporary checkpoints go")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        pid, port, directory, steps, mode, started = args.child
        child(int(pid), port, directory, int(steps), mode, float(started))
        return None
    if args.quick:
        args.repeats, args.consumed = 1, "20,200"
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    try:
        consumed = [int(n) for n in args.consumed.split(",")]
    except ValueError:
        parser.error(f"--consumed takes comma-separated batch counts, got {args.consumed!r}")
    if any(n < 1 for n in consumed):
        parser.error(f"--consumed counts must be positive, got {args.consumed!r}")

    print(versions_line("jax", "flax", "orbax-checkpoint", "grain", "numpy"))
    print(machine_line())
    root = tempfile.mkdtemp(prefix="nnxloop-bench-mp-resume-", dir=args.dir)
    samples: dict[tuple[int, str], list[float]] = {(n, m): [] for n in consumed for m in MODES}
    try:
        for n in consumed:
            outs = launch(os.path.join(root, f"saved-{n}"), n, "saved state", timed=False)
            if not all(f"trained {n}" in out for out in outs):
                raise RuntimeError(f"the run of {n} steps failed:\n{outs[0][-3000:]}")
        for i in range(args.repeats):
            for n in consumed:
                for mode in MODES:
                    copy = os.path.join(root, f"resume-{n}-{i}-{mode.replace(' ', '-')}")
                    shutil.copytree(os.path.join(root, f"saved-{n}"), copy)
                    samples[n, mode].append(first_step(launch(copy, n, mode, timed=True), n))
                    shutil.rmtree(copy)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"\n2 processes x 1 CPU device, {args.repeats} repeats: process start to the first "
        "step after the resume, seconds (median [min-max])"
    )
    base = consumed[0]
    results = {}
    for mode in MODES:
        for n in consumed:
            med = statistics.median(samples[n, mode])
            ratio = med / statistics.median(samples[base, mode])
            results[n, mode] = med
            print(
                f"  {mode:12s} after {n:>6d} batches  {spread(samples[n, mode]):>24s}"
                f"  {ratio:5.2f}x of {base}"
            )
    last = consumed[-1]
    ratio = results[last, "saved state"] / results[base, "saved state"]
    verdict = "met" if ratio <= FLOOR else "NOT met"
    print(
        f"\nfloor (saved state, {last} vs {base} batches <= {FLOOR:.2f}x): {ratio:.3f}x, {verdict}"
    )
    return results


if __name__ == "__main__":
    main()
