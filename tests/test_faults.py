"""Faults lose nothing and hang nothing: log lines across kills, callback state matched by
identity, a failing log disk."""

import errno
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import loss_fn, make_batches, make_model, subprocess_env, tx

import nnxloop as nl
from nnxloop.checkpointing import lock


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


# -- one live writer per checkpoint directory -------------------------------------------------


def write_lock(directory, pid, host=None):
    os.makedirs(directory, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": time.time()}
    with open(os.path.join(directory, ".nnxloop-lock"), "w") as f:
        json.dump(holder, f)


def test_a_second_live_writer_fails_at_fit_start_naming_the_holder(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path / "c", other.pid)
        trainer = nl.Trainer(
            make_model(), tx(), loss_fn=loss_fn, callbacks=[nl.CheckpointCallback(tmp_path / "c")]
        )
        with pytest.raises(nl.CheckpointError, match=f"PID {other.pid}"):
            trainer.fit(make_batches(2), epochs=1)
        assert trainer.step == 0
    finally:
        other.kill()
        other.wait()
    assert not [n for n in os.listdir(tmp_path / "c") if n.isdigit()]


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "c", dead.pid)
    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[nl.CheckpointCallback(tmp_path / "c")]
    )
    trainer.fit(make_batches(2), epochs=1)
    assert "2" in os.listdir(tmp_path / "c")
    assert ".nnxloop-lock" not in os.listdir(tmp_path / "c")  # released when fit ended


def test_another_host_s_lock_counts_until_it_goes_stale(tmp_path):
    write_lock(tmp_path / "c", 1, host="some-other-host")
    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[nl.CheckpointCallback(tmp_path / "c")]
    )
    with pytest.raises(nl.CheckpointError, match="some-other-host"):
        trainer.fit(make_batches(2), epochs=1)
    old = time.time() - 3600  # not refreshed for an hour: that run is gone
    os.utime(tmp_path / "c" / ".nnxloop-lock", (old, old))
    trainer.fit(make_batches(2), epochs=1)
    assert trainer.step == 2


@pytest.mark.slow
def test_two_processes_on_one_directory_the_second_fails(tmp_path):
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[2])\n"
        "from conftest import *\n"
        "import nnxloop as nl\n"
        "class Slow(nl.Callback):\n"
        "    def on_step_end(self, trainer, step, logs):\n"
        "        print('step', step, flush=True); time.sleep(0.2)\n"
        "t = nl.Trainer(make_model(), tx(), loss_fn=loss_fn,\n"
        "    callbacks=[Slow(), nl.CheckpointCallback(sys.argv[1], every_steps=3)])\n"
        "t.fit(make_batches(), max_steps=60)\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    args = [sys.executable, "-c", script, str(tmp_path / "c"), here]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        for line in first.stdout:
            if line.startswith("step"):
                break
        second = subprocess.run(
            args, capture_output=True, text=True, env=subprocess_env(), timeout=120
        )
        assert second.returncode != 0
        assert f"PID {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
        first.stdout.close()


# -- a best-model directory holding another run's checkpoints --------------------------------


def test_a_fresh_run_refuses_a_best_model_directory_of_another_run(tmp_path):
    def run():
        best = nl.BestModelCallback(tmp_path / "best", restore_on_train_end=True)
        trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[best])
        trainer.fit(make_batches(2), val_data=make_batches(1), epochs=2)
        return trainer

    run()
    before = sorted(os.listdir(tmp_path / "best"))
    with pytest.raises(nl.CheckpointError, match="another run"):
        run()
    assert sorted(os.listdir(tmp_path / "best")) == before


# -- unclear errors made clear -----------------------------------------------------------------


def checkpointing_trainer(directory, **kwargs):
    callback = nl.CheckpointCallback(directory, every_steps=2, max_to_keep=None, **kwargs)
    return nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[callback])


def test_a_sync_save_that_fails_names_its_step(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(nl.CheckpointError, match="step 4") as info:
        checkpointing_trainer(tmp_path / "c").fit(make_batches(), max_steps=6)
    assert "No space left on device" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert [n for n in os.listdir(tmp_path / "c") if n.isdigit()] == ["2"]


def test_a_checkpoint_whose_meta_names_another_step_is_set_aside(tmp_path, caplog):
    checkpointing_trainer(tmp_path / "c").fit(make_batches(), max_steps=4)
    store = nl.CheckpointCallback(tmp_path / "c").store
    meta = store.read_meta(4)
    store.replace_meta(4, {**meta, "step": 20})
    trainer = checkpointing_trainer(tmp_path / "c")
    with caplog.at_level("WARNING", logger="nnxloop"):
        trainer.fit(make_batches(), max_steps=4)
    assert "step 4" in caplog.text and "unreadable" in caplog.text
    assert trainer.step == 4  # resumed from step 2 and trained again
    assert any(n.startswith("4.unreadable-") for n in os.listdir(tmp_path / "c"))


def test_no_readable_checkpoint_refuses_to_start_over_silently(tmp_path):
    checkpointing_trainer(tmp_path / "c").fit(make_batches(), max_steps=4)
    store = nl.CheckpointCallback(tmp_path / "c").store
    for step in (2, 4):
        store.replace_meta(step, {**store.read_meta(step), "step": 99})
    for _ in range(2):  # and again on the next rerun, when nothing is left but what was set aside
        trainer = checkpointing_trainer(tmp_path / "c")
        with pytest.raises(nl.CheckpointError, match="unreadable") as info:
            trainer.fit(make_batches(), max_steps=4)
        assert "2.unreadable-" in str(info.value) and "4.unreadable-" in str(info.value)
        assert trainer.step == 0


def test_keep_every_steps_zero_is_refused_in_our_words():
    with pytest.raises(ValueError, match="keep_every_steps must be a positive int or None"):
        nl.CheckpointCallback("unused", keep_every_steps=0)


def test_an_int_metric_name_is_refused():
    def int_named(model, batch):
        loss, _ = loss_fn(model, batch)
        return loss, {0: loss}

    with pytest.raises(TypeError, match="metric names must be strings"):
        nl.Trainer(make_model(), tx(), loss_fn=int_named).fit(make_batches(2), epochs=1)


def test_a_non_json_iterator_state_is_reported_once(tmp_path, caplog):
    class Opaque:
        def __init__(self, batches):
            self.batches = batches

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            return OpaqueIterator(self.batches)

    class OpaqueIterator:
        def __init__(self, batches):
            self.it = iter(batches)

        def __next__(self):
            return next(self.it)

        def get_state(self):
            return object()

        def set_state(self, state):
            raise AssertionError("never restored from a state that was not saved")

    with caplog.at_level("WARNING", logger="nnxloop"):
        checkpointing_trainer(tmp_path / "c").fit(Opaque(make_batches(3)), max_steps=9)
    assert caplog.text.count("not JSON-serialisable") == 1


@pytest.mark.slow
def test_a_third_batch_shape_warns_once_naming_the_shapes(caplog):
    sizes = [16, 16, 8, 12, 4, 16, 20]  # five shapes: compiles for each
    data = [b for n in sizes for b in make_batches(1, batch=n, seed=n)]
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, stage_data=False)
    with caplog.at_level("WARNING", logger="nnxloop"):
        trainer.fit(data, epochs=2)
    warnings = [r.message for r in caplog.records if "compiled again" in r.message]
    assert len(warnings) == 1
    assert "(16, 6)" in warnings[0] and "(8, 6)" in warnings[0] and "drop_remainder" in warnings[0]


def test_one_shape_and_a_smaller_last_batch_do_not_warn(caplog):
    data = make_batches(3) + make_batches(1, batch=8)
    with caplog.at_level("WARNING", logger="nnxloop"):
        nl.Trainer(make_model(), tx(), loss_fn=loss_fn).fit(data, epochs=2)
    assert "compiled again" not in caplog.text


def damage(directory, step):
    """Truncates every array file of a step's model item, as a failing disk could."""
    for root, _, files in os.walk(os.path.join(directory, str(step), "model")):
        for name in files:
            if root.endswith("/d") or "/d/" in root + "/":
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)


# orbax leaves an event-loop task behind when a restore fails on damaged files (not ours)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_load_model_skips_a_damaged_latest_step_and_names_a_damaged_asked_one(tmp_path, caplog):
    checkpointing_trainer(tmp_path / "c").fit(make_batches(), max_steps=4)
    damage(tmp_path / "c", 4)
    with caplog.at_level("WARNING", logger="nnxloop"):
        model = nl.load_model(tmp_path / "c", make_model)
    assert "step 4" in caplog.text and "loading the one before" in caplog.text
    assert model is not None
    with pytest.raises(nl.CheckpointError, match="step 4 .* cannot be read"):
        nl.load_model(tmp_path / "c", make_model, step=4)
    gc.collect()


def test_ctrl_c_during_a_save_finishes_the_save_then_stops(tmp_path):
    import signal

    store_type = type(nl.CheckpointCallback(tmp_path / "unused").store)
    real = store_type.save

    def interrupted(self, step, *args, **kwargs):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the save
            time.sleep(0.05)
        return real(self, step, *args, **kwargs)

    trainer = checkpointing_trainer(tmp_path / "c")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_type, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(make_batches(), max_steps=8)
    names = os.listdir(tmp_path / "c")
    assert "4" in names and not [n for n in names if "tmp" in n]
    assert trainer.step == 4


def test_a_lock_naming_this_process_but_not_held_by_it_is_taken_over(tmp_path, caplog):
    # A restarted container often gets the same host name and PID as the run that held the
    # lock before it was killed; that holder is gone, since this process does not hold it.
    (tmp_path / lock.LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0})
    )
    lock.acquire(str(tmp_path))
    try:
        assert "Taking over the lock" in caplog.text
    finally:
        lock.release(str(tmp_path))
    assert not (tmp_path / lock.LOCK_FILE).exists()
