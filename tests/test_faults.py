"""Faults lose nothing and hang nothing: log lines across kills, callback state matched by
identity, a failing log disk."""

import errno
import json
import os
import threading

import pytest
from conftest import loss_fn, make_batches, make_model, tx

import nnxloop as nl


def read_jsonl_steps(logdir):
    path = os.path.join(logdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if "loss" in line]


def read_tensorboard_steps(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    if "loss" not in acc.Tags()["scalars"]:
        return []
    return [e.step for e in acc.Scalars("loss")]


# -- every log line up to a checkpoint is on disk when the checkpoint counts ----------------


def test_log_lines_up_to_a_checkpoint_are_on_disk_in_both_files(tmp_path):
    logdir = tmp_path / "logs"
    on_disk = {}

    class Probe(nl.Callback):  # right after the checkpoint of step 7, where a kill could land
        def on_step_end(self, trainer, step, logs):
            if step == 7:
                on_disk["jsonl"] = read_jsonl_steps(logdir)
                on_disk["tensorboard"] = read_tensorboard_steps(logdir)

    callbacks = [
        nl.MetricsLogger(logdir, every_steps=5),
        nl.CheckpointCallback(tmp_path / "ckpt", every_steps=7),
        Probe(),
    ]
    nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=callbacks).fit(
        make_batches(), max_steps=9
    )
    assert on_disk == {"jsonl": [5], "tensorboard": [5]}


# -- a log disk that fails stops the run with an error naming the directory -----------------


def test_a_failing_log_disk_stops_fit_with_an_error_naming_the_directory(tmp_path, monkeypatch):
    from tensorboardX.record_writer import RecordWriter

    logdir = tmp_path / "logs"
    real = RecordWriter.write
    written = {"n": 0}

    def full_disk(self, data):
        written["n"] += 1
        if written["n"] > 40:  # the header, hparams and the first steps' lines fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(RecordWriter, "write", full_disk)
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[
            nl.MetricsLogger(logdir, every_steps=1),
            nl.CheckpointCallback(tmp_path / "ckpt", every_steps=3),
        ],
    )
    outcome = {}

    def run():  # in a thread, so that a hang fails the test instead of stalling the suite
        try:
            trainer.fit(make_batches(), epochs=20)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "fit hung on a failing log disk"
    error = outcome.get("error")
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert str(logdir) in str(error) and "No space left" in str(error)
    assert trainer.step < 240
    assert os.listdir(tmp_path / "ckpt")  # the checkpoints before it are kept


# -- callback state is matched by identity, not by list position ----------------------------


class Counter(nl.Callback):
    """A user's callback with state: how many steps it has seen over the whole run."""

    def __init__(self):
        self.seen = 0

    def on_step_end(self, trainer, step, logs):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_callback_state_follows_the_callback_when_the_list_changes(tmp_path):
    def trainer_with(*front):
        stopper = nl.EarlyStopping(patience=3, min_delta=10.0)
        counter = Counter()
        callbacks = [*front, stopper, counter, nl.CheckpointCallback(tmp_path / "c")]
        trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=callbacks)
        return trainer, stopper, counter

    trainer, stopper, counter = trainer_with()
    trainer.fit(make_batches(2), val_data=make_batches(1), epochs=2)
    assert (stopper.wait, counter.seen) == (1, 4)
    trainer, stopper, counter = trainer_with(nl.TerminateOnNaN())  # one more in front
    trainer.fit(make_batches(2), val_data=make_batches(1), epochs=3)
    assert stopper.wait == 2 and counter.seen == 6  # carried on, not restarted


def test_saved_state_no_callback_claims_is_reported(tmp_path, caplog):
    def run(*callbacks):
        trainer = nl.Trainer(
            make_model(),
            tx(),
            loss_fn=loss_fn,
            callbacks=[*callbacks, nl.CheckpointCallback(tmp_path / "c")],
        )
        trainer.fit(make_batches(2), val_data=make_batches(1), epochs=len(callbacks) + 1)

    run(Counter())
    with caplog.at_level("WARNING", logger="nnxloop"):
        run(nl.TerminateOnNaN())  # the Counter's state has no taker
    assert "state of callbacks this run does not have: Counter" in caplog.text


def test_two_callbacks_with_one_state_key_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="state_key 'EarlyStopping\\(val_loss\\)'"):
        nl.Trainer(
            make_model(),
            tx(),
            loss_fn=loss_fn,
            callbacks=[nl.EarlyStopping(), nl.EarlyStopping(patience=2)],
        )
    # different monitors, or directories, tell them apart
    nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[
            nl.EarlyStopping(),
            nl.EarlyStopping(monitor="val_accuracy", mode="max"),
            nl.BestModelCallback(tmp_path / "a"),
            nl.BestModelCallback(tmp_path / "b"),
        ],
    )


def test_a_checkpoint_with_position_keys_still_restores_its_callbacks(tmp_path):
    # Checkpoints written before state keys named each state by list position.
    def trainer_with(stopper):
        callbacks = [stopper, nl.CheckpointCallback(tmp_path / "c", every_epochs=1)]
        return nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=callbacks)

    stopper = nl.EarlyStopping(patience=5, min_delta=10.0)
    trainer_with(stopper).fit(make_batches(1), val_data=make_batches(1), epochs=3)
    store = nl.CheckpointCallback(tmp_path / "c").store
    meta = store.read_meta(3)
    meta["callbacks"] = {"0:EarlyStopping": meta["callbacks"]["EarlyStopping(val_loss)"]}
    store.replace_meta(3, meta)
    stopper = nl.EarlyStopping(patience=5, min_delta=10.0)
    trainer_with(stopper).fit(make_batches(1), val_data=make_batches(1), epochs=4)
    assert stopper.wait == 3
