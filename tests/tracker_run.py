"""A run logging to MLflow or W&B, for the kill-and-rerun tracker tests:
`python tracker_run.py WORKDIR TRACKING_URI` (MLflow), `python tracker_run.py WORKDIR wandb`
(an offline W&B run under WORKDIR). Prints `step N` after every step."""

import os
import sys
import time

from conftest import loss_fn, make_batches, make_model, tx

import nnxloop as nl


class Announce(nl.Callback):
    def on_step_end(self, trainer, step, logs):
        time.sleep(0.01)
        print(f"step {step}", flush=True)


def main(workdir, tracking_uri):
    if tracking_uri == "wandb":
        writer = nl.writers.WandbWriter(project="kills", mode="offline", dir=workdir)
    else:
        writer = nl.writers.MLflowWriter(tracking_uri=tracking_uri, experiment="kills")
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[
            Announce(),
            # Before the logger: its checkpoints still hold every line up to their step.
            nl.CheckpointCallback(os.path.join(workdir, "ckpt"), every_steps=5),
            nl.MetricsLogger(every_steps=2, writers=[writer]),
        ],
        progress=False,
    )
    trainer.fit(make_batches(), epochs=2)
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
