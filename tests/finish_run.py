"""A training script for the rerun tests: `python finish_run.py WORKDIR HOW`.

HOW says how the run ends: `early_stop` (EarlyStopping), `max_steps` (on an epoch boundary),
`stop_training` (a callback stops it mid-epoch, on a step already saved) or `epochs`. Prints
`start N` when training starts, `step N` after each step, and at the end `updates U` (steps
this process did) and `final N`; writes every leaf of the training state to WORKDIR/final.npz.
"""

import os
import sys
import time

import optax
from conftest import loss_fn, make_batches, make_model, save_final_state

import nnxloop as nl


class Announce(nl.Callback):
    def __init__(self):
        self.updates = 0
        self.started = False

    def on_epoch_begin(self, trainer, epoch):
        if not self.started:
            self.started = True
            print(f"start {trainer.step}", flush=True)

    def on_step_end(self, trainer, step, logs):
        self.updates += 1
        time.sleep(0.02)  # time for a signal to land mid-run
        print(f"step {step}", flush=True)


class StopAt(nl.Callback):
    def on_step_end(self, trainer, step, logs):
        if step == 4:
            trainer.stop_training = True


def main(workdir, how):
    announce = Announce()
    callbacks = [
        announce,
        # Ahead of the checkpoint: a stop by SIGTERM must not put the best weights into it.
        nl.BestModelCallback(os.path.join(workdir, "best"), restore_on_train_end=True),
        nl.CheckpointCallback(os.path.join(workdir, "ckpt"), every_steps=4, max_to_keep=2),
    ]
    fit = {"epochs": 6}
    if how == "early_stop":
        # No evaluation after the first improves by 10: stops at the second evaluation.
        callbacks.append(nl.EarlyStopping(monitor="val_loss", patience=1, min_delta=10.0))
    elif how == "max_steps":
        fit = {"max_steps": 12}  # 3 batches an epoch: ends with epoch 3
    elif how == "stop_training":
        callbacks.append(StopAt())  # after the checkpoint: it has saved step 4 unstopped
    trainer = nl.Trainer(make_model(), optax.adam(1e-2), loss_fn=loss_fn, callbacks=callbacks)
    history = trainer.fit(make_batches(3), val_data=make_batches(1, seed=1), **fit)
    if history.preempted:
        print(f"preempted {trainer.step}", flush=True)
        return
    save_final_state(trainer, os.path.join(workdir, "final.npz"))
    print(f"updates {announce.updates}", flush=True)
    print(f"final {trainer.step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
