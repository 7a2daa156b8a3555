"""One process of a 2-process run on 127.0.0.1:
`python multiprocess_run.py PROCESS_ID PORT WORKDIR`.

Each process has 2 CPU devices and passes its half of every batch. Prints `step N` after each
step (process 0 only), `preempted N` if stopped by SIGTERM, and writes
WORKDIR/final_<id>.npz with the parameters as this process sees them.
"""

import sys
import time

import jax
from conftest import loss_fn, make_batches, make_model, sgd

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402

import nnxloop as nl  # noqa: E402


class Announce(nl.Callback):
    def on_step_end(self, trainer, step, logs):
        time.sleep(0.02)
        print(f"step {step}", flush=True)


def main(process_id, port, workdir):
    nl.distributed.initialize(
        f"127.0.0.1:{port}", 2, process_id, heartbeat_timeout_seconds=5, initialization_timeout=60
    )
    half = slice(8 * process_id, 8 * (process_id + 1))
    batches = [{k: v[half] for k, v in b.items()} for b in make_batches(n_batches=12)]
    val = [{k: v[half] for k, v in b.items()} for b in make_batches(2, seed=1)]
    trainer = nl.Trainer(
        make_model(),
        sgd(),
        loss_fn=loss_fn,
        steps_per_dispatch=2,
        callbacks=[
            Announce(),
            nl.CheckpointCallback(f"{workdir}/ckpt", every_steps=4),
            nl.MetricsLogger(f"{workdir}/logs", every_steps=4),
        ],
    )
    history = trainer.fit(batches, val_data=val, epochs=3)
    if history.preempted:
        print(f"preempted {trainer.step}", flush=True)
    params = jax.tree.leaves(nl.trainer.nnx.state(trainer.model, nl.trainer.nnx.Param))
    np.savez(f"{workdir}/final_{process_id}.npz", *[np.asarray(p) for p in params])
    print(
        f"done {trainer.step} {history.evals[-1]['val_loss'] if history.evals else ''}", flush=True
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
