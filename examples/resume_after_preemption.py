"""A run stopped by SIGTERM (as a cluster preempts a job) and resumed exactly.

    python examples/resume_after_preemption.py [--workdir runs/preemption]

It trains the digits model in three child processes and compares the final parameters bit
for bit: one run uninterrupted; one that receives SIGTERM mid-run (nnxloop finishes the
current step, saves a checkpoint and ends `fit` cleanly); and the same command once more,
which resumes from that checkpoint and finishes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
from flax import nnx

import nnxloop as nl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import DigitsMLP, digits_datasets, loss_fn  # noqa: E402


class Announce(nl.Callback):
    def on_step_end(self, trainer, step, logs):
        print(f"step {step}", flush=True)


def train(workdir: str, epochs: int) -> str:
    """The training script itself: rerunning it resumes from `workdir`."""
    train_data, val = digits_datasets(batch_size=64)
    trainer = nl.Trainer(
        DigitsMLP(rngs=nnx.Rngs(0)),
        optax.adam(3e-3),
        loss_fn=loss_fn,
        callbacks=[Announce(), nl.CheckpointCallback(os.path.join(workdir, "ckpt"))],
    )
    history = trainer.fit(train_data, val_data=val, epochs=epochs)
    params = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))]
    np.savez(os.path.join(workdir, "params.npz"), *params)
    outcome = f"preempted at step {trainer.step}" if history.preempted else "finished"
    print(outcome, flush=True)
    return outcome


def child(workdir: str, epochs: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", workdir, "--epochs", str(epochs)],
        stdout=subprocess.PIPE,
        text=True,
    )


def main(argv=None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/preemption")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--stop-at", type=int, default=30, help="step to send SIGTERM after")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        train(args.child, args.epochs)
        return True

    reference = os.path.join(args.workdir, "uninterrupted")
    preempted = os.path.join(args.workdir, "preempted")
    os.makedirs(reference, exist_ok=True)
    os.makedirs(preempted, exist_ok=True)
    # Every run is a fresh process of this same script, as a scheduler would start it.
    proc = child(reference, args.epochs)
    print("uninterrupted run:", proc.communicate(timeout=300)[0].strip().splitlines()[-1])

    proc = child(preempted, args.epochs)
    try:
        for line in proc.stdout:
            if line.strip() == f"step {args.stop_at}":
                proc.send_signal(signal.SIGTERM)  # what a scheduler sends before killing a job
                break
        print("first run:", proc.communicate(timeout=300)[0].strip().splitlines()[-1])
    finally:
        proc.kill()
    proc = child(preempted, args.epochs)
    print("second run:", proc.communicate(timeout=300)[0].strip().splitlines()[-1])

    with np.load(os.path.join(reference, "params.npz")) as a:
        with np.load(os.path.join(preempted, "params.npz")) as b:
            same = all(np.array_equal(a[k], b[k]) for k in a.files)
    print(f"parameters bitwise equal to the uninterrupted run: {same}")
    return same


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
