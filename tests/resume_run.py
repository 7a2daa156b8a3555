"""The kill-and-rerun tests' script: `python resume_run.py WORKDIR MODE [ROOT [EVERY]]`.

MODE is `sync` (a list of batches, resumed by skipping), `async` (AsyncSaveCallback and a
grain dataset, resumed through its iterator state) or `accumulate` (the grain dataset, three
batches to an update: 3 updates an epoch, one batch left out). Checkpoints go to ROOT/ckpt and
ROOT/best (ROOT is WORKDIR unless given, e.g. a `gs://` URL), every EVERY steps (3 unless given).
Prints `step N` after every step; at the end writes every leaf of the training state to
WORKDIR/final.npz.
"""

import os
import sys
import time

import grain
from conftest import loss_fn, make_batches, make_model, save_final_state, tx

import nnxloop as nl


class Announce(nl.Callback):
    started = False

    def on_epoch_begin(self, trainer, epoch):
        if not self.started:  # after CheckpointCallback.on_train_begin has restored
            self.started = True
            print(f"start {trainer.step}", flush=True)

    def on_step_end(self, trainer, step, logs):
        time.sleep(0.01)  # spread the steps out, so kills land at varied moments
        print(f"step {step}", flush=True)


def main(workdir, mode, root=None, every="3"):
    root = root or workdir
    join = (lambda name: f"{root}/{name}") if "://" in root else (lambda n: os.path.join(root, n))
    batches = make_batches(n_batches=10)
    if mode in ("async", "accumulate"):
        data = grain.MapDataset.source(batches).map(lambda b: b)
    else:
        data = batches
    announce = Announce()
    callbacks = [
        announce,
        nl.CheckpointCallback(join("ckpt"), every_steps=int(every), max_to_keep=2),
        nl.BestModelCallback(join("best"), max_to_keep=2),
    ]
    if mode == "async":
        callbacks.append(nl.AsyncSaveCallback())
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=callbacks,
        steps_per_dispatch=2,
        gradient_accumulation_steps=3 if mode == "accumulate" else 1,
    )
    history = trainer.fit(data, val_data=make_batches(2, seed=1), epochs=4, eval_every_steps=7)
    if not announce.started:  # a finished run: no epoch began
        print(f"start {trainer.step}", flush=True)
    if history.preempted:
        print(f"preempted {trainer.step}", flush=True)
        return
    save_final_state(trainer, os.path.join(workdir, "final.npz"))
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
