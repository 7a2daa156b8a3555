"""One process of a 2-process run on 127.0.0.1:
`python multiprocess_run.py PROCESS_ID PORT WORKDIR DEVICES_PER_PROCESS`.

Each process has DEVICES_PER_PROCESS CPU devices (1: the one-accelerator-per-process layout of
most clusters; 2: several local devices) and passes its half of every batch, from an iterator
with `get_state` / `set_state` whose state names its process. Prints `step N` after each step
(each step end sleeps $STEP_SECONDS, 0.02 by default), `set_state P POSITION` when a resume
restores process P's iterator, `preempted N` if stopped by SIGTERM, and writes
WORKDIR/final_<id>.npz with the parameters as this process sees them.
"""

import os
import sys
import time

import jax
from conftest import injected_sgd, loss_fn, make_batches, make_model

jax.config.update("jax_num_cpu_devices", int(sys.argv[4]))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nnxloop as nl  # noqa: E402

LEARNING_RATE = 0.03  # set with set_learning_rate before fit (the test's reference does too)


class ProcessShare:
    """This process's half of every batch; its iterators checkpoint their position."""

    def __init__(self, batches, process_id):
        half = slice(8 * process_id, 8 * (process_id + 1))
        self.batches = [{k: v[half] for k, v in b.items()} for b in batches]
        self.process_id = process_id

    def __iter__(self):
        return ShareIterator(self)


class ShareIterator:
    def __init__(self, share):
        self.share, self.position = share, 0

    def __next__(self):
        if self.position >= len(self.share.batches):
            raise StopIteration
        self.position += 1
        return self.share.batches[self.position - 1]

    def get_state(self):
        return {"process": self.share.process_id, "position": self.position}

    def set_state(self, state):
        # A state saved by the other process would put this one on the wrong batches.
        assert state["process"] == self.share.process_id, state
        self.position = state["position"]
        print(f"set_state {state['process']} {state['position']}", flush=True)


STEP_SECONDS = float(os.environ.get("STEP_SECONDS", "0.02"))


class Announce(nl.Callback):
    def on_step_end(self, trainer, step, logs):
        time.sleep(STEP_SECONDS)
        print(f"step {step}", flush=True)


def main(process_id, port, workdir):
    nl.distributed.initialize(
        f"127.0.0.1:{port}", 2, process_id, heartbeat_timeout_seconds=5, initialization_timeout=60
    )
    assert jax.local_device_count() == int(sys.argv[4]), jax.local_devices()
    batches = ProcessShare(make_batches(n_batches=12), process_id)
    val = ProcessShare(make_batches(2, seed=1), process_id)
    trainer = nl.Trainer(
        make_model(),
        injected_sgd(),
        loss_fn=loss_fn,
        steps_per_dispatch=2,
        callbacks=[
            Announce(),
            nl.CheckpointCallback(f"{workdir}/ckpt", every_steps=4),
            nl.MetricsLogger(f"{workdir}/logs", every_steps=4),
        ],
    )
    trainer.set_learning_rate(LEARNING_RATE)
    history = trainer.fit(batches, val_data=val, epochs=3)
    if history.preempted:
        print(f"preempted {trainer.step}", flush=True)
    params = jax.tree.leaves(nnx.state(trainer.model, nnx.Param))
    np.savez(f"{workdir}/final_{process_id}.npz", *[np.asarray(p) for p in params])
    print(
        f"done {trainer.step} {history.evals[-1]['val_loss'] if history.evals else ''}", flush=True
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
