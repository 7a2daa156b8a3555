import json
import logging
import os
import sys

import numpy as np
import optax
import pytest
from conftest import loss_fn, make_batches, make_model, tx

import nnxloop as nl
from nnxloop import writers
from nnxloop._run import totals


def read_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_jsonl(logdir):
    with open(os.path.join(logdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class Losses(nl.Callback):
    def __init__(self):
        self.losses = {}

    def on_step_end(self, trainer, step, logs):
        self.losses[step] = float(logs["loss"])


@pytest.mark.slow
def test_tensorboard_and_jsonl_have_the_expected_scalars(tmp_path):
    losses = Losses()
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(0.01, 0.0, 12))
    trainer = nl.Trainer(
        make_model(),
        opt,
        loss_fn=loss_fn,
        steps_per_dispatch=3,
        callbacks=[losses, nl.MetricsLogger(tmp_path, every_steps=4)],
    )
    trainer.fit(make_batches(), val_data=make_batches(2, seed=1), max_steps=12, eval_every_steps=6)
    scalars = read_tensorboard(tmp_path)
    # every 4 steps, at the end of the dispatch of 3 that gets there (evals cut one at 6)
    assert [s for s, _ in scalars["loss"]] == [6, 9, 12]
    assert [s for s, _ in scalars["val_loss"]] == [6, 12]
    for tag in ("accuracy", "learning_rate", "steps_per_sec", "examples_per_sec", "val_accuracy"):
        assert tag in scalars
    # the logged loss is the on-device average over the window, not one step's value
    window = np.mean([losses.losses[s] for s in (7, 8, 9)])
    assert dict(scalars["loss"])[9] == pytest.approx(window, rel=1e-5)
    # learning_rate is the injected value the 6th update used (schedule count 5)
    lrs = dict(scalars["learning_rate"])
    assert lrs[6] == pytest.approx(0.01 * (1 - 5 / 12), rel=1e-5)

    records = read_jsonl(tmp_path)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [6, 9, 12]
    assert all(isinstance(r["time"], float) for r in records)
    assert train[1]["loss"] == pytest.approx(window, rel=1e-5)


def test_learning_rate_from_a_schedule_argument(tmp_path):
    schedule = optax.cosine_decay_schedule(0.1, 10)
    trainer = nl.Trainer(
        make_model(),
        optax.sgd(schedule),
        loss_fn=loss_fn,
        callbacks=[nl.MetricsLogger(tmp_path, every_steps=5, learning_rate=schedule)],
    )
    trainer.fit(make_batches(), max_steps=10)
    lrs = {r["step"]: r["learning_rate"] for r in read_jsonl(tmp_path)}
    assert lrs[5] == pytest.approx(float(schedule(4)))  # the rate the 5th update used


@pytest.mark.slow
def test_resumed_run_does_not_duplicate_jsonl_lines(tmp_path):
    ckpt_dir, logdir = tmp_path / "ckpt", tmp_path / "logs"

    def run():
        trainer = nl.Trainer(
            make_model(),
            tx(),
            loss_fn=loss_fn,
            callbacks=[
                nl.CheckpointCallback(ckpt_dir, every_steps=4, max_to_keep=None),
                nl.MetricsLogger(logdir, every_steps=2),
            ],
        )
        trainer.fit(make_batches(), max_steps=10)

    run()
    # as if the process had been killed just after logging step 10 and saving only up to 4
    for step in ("8", "10"):
        os.rename(ckpt_dir / step, tmp_path / f"gone-{step}")
    first = read_jsonl(logdir)
    run()
    steps = [r["step"] for r in read_jsonl(logdir)]
    assert steps == [2, 4, 6, 8, 10]
    assert [r["loss"] for r in read_jsonl(logdir)] == pytest.approx([r["loss"] for r in first])


@pytest.mark.parametrize("logger_first", [True, False])
def test_a_checkpoint_has_every_log_line_up_to_its_step_written(
    tmp_path, monkeypatch, logger_first
):
    # As if the host ran far ahead of the device: no queued line is ever found ready early.
    monkeypatch.setattr(totals.PendingTotals, "ready", lambda self: False)
    logdir = tmp_path / "logs"
    on_disk = {}

    class Probe(nl.Callback):  # runs right after the checkpoint is saved, as a kill could
        def on_step_end(self, trainer, step, logs):
            if step in (4, 8):
                on_disk[step] = [r["step"] for r in read_jsonl(logdir) if "loss" in r]

    logger = nl.MetricsLogger(logdir, every_steps=2)
    checkpoints = nl.CheckpointCallback(tmp_path / "ckpt", every_steps=4)
    # Whatever their order: a checkpoint saved before the logger sees its step still has it.
    callbacks = [logger, checkpoints, Probe()] if logger_first else [checkpoints, logger, Probe()]
    nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=callbacks).fit(
        make_batches(), max_steps=10
    )
    assert on_disk == {4: [2, 4], 8: [2, 4, 6, 8]}
    assert [r["step"] for r in read_jsonl(logdir) if "loss" in r] == [2, 4, 6, 8, 10]


def test_logdir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[nl.MetricsLogger(path)])
    with pytest.raises(nl.CheckpointError, match=f"Log directory {path} is a file"):
        trainer.fit(make_batches(), max_steps=2)


class FakeEval(nl.Callback):
    def __init__(self, values):
        self.values = iter(values)

    def on_eval_end(self, trainer, step, metrics):
        metrics["val_score"] = next(self.values)


def test_early_stopping_patience_and_min_delta():
    stop = nl.EarlyStopping(monitor="val_score", mode="max", patience=2, min_delta=0.05)
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[FakeEval([0.5, 0.6, 0.62, 0.64, 0.9, 0.9]), stop],
    )
    history = trainer.fit(
        make_batches(), val_data=make_batches(1), max_steps=12, eval_every_steps=2
    )
    assert trainer.step == 8 and history.stopped_early
    assert stop.best == 0.6 and stop.wait == 2


def test_early_stopping_state_survives_resume(tmp_path):
    def run(values, max_steps):
        stop = nl.EarlyStopping(monitor="val_score", patience=3)
        trainer = nl.Trainer(
            make_model(),
            tx(),
            loss_fn=loss_fn,
            callbacks=[FakeEval(values), stop, nl.CheckpointCallback(tmp_path, every_steps=2)],
        )
        trainer.fit(
            make_batches(), val_data=make_batches(1), max_steps=max_steps, eval_every_steps=2
        )
        return trainer, stop

    run([1.0, 2.0, 3.0], 6)  # best 1.0, two evaluations without improvement
    trainer, stop = run([4.0, 5.0], 12)
    assert trainer.step == 8  # the third non-improving evaluation stops it
    assert (stop.best, stop.wait) == (1.0, 3)


def test_early_stopping_missing_metric_lists_names():
    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[nl.EarlyStopping(monitor="val_f1")]
    )
    with pytest.raises(KeyError, match=r"only \['val_accuracy', 'val_loss'\]"):
        trainer.fit(make_batches(), val_data=make_batches(1), epochs=1)


def diverging(model, batch):
    loss, metrics = loss_fn(model, batch)
    return loss * 1e30, metrics


@pytest.mark.parametrize("order", ["checkpoint-first", "nan-first"])
def test_terminate_on_nan_and_no_broken_checkpoint(tmp_path, order):
    callbacks = [
        nl.CheckpointCallback(tmp_path, every_steps=1, max_to_keep=None),
        nl.TerminateOnNaN(),
    ]
    if order == "nan-first":
        callbacks.reverse()
    trainer = nl.Trainer(make_model(), optax.sgd(1e10), loss_fn=diverging, callbacks=callbacks)
    history = trainer.fit(make_batches(), epochs=5)
    assert history.stopped_early and trainer.step < 60
    for step in sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()):
        model = nl.load_model(tmp_path, make_model, step=step)
        params = [
            np.asarray(x)
            for x in __import__("jax").tree.leaves(__import__("flax").nnx.state(model))
            if np.issubdtype(np.asarray(x).dtype, np.floating)
        ]
        assert all(np.isfinite(p).all() for p in params)


def test_progress_bar_only_when_asked(capsys):
    nl.Trainer(make_model(), tx(), loss_fn=loss_fn, progress=True, log_every_steps=2).fit(
        make_batches(), val_data=make_batches(1), max_steps=4, eval_every_steps=4
    )
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=" in err
    nl.Trainer(make_model(), tx(), loss_fn=loss_fn, progress=False).fit(make_batches(), max_steps=2)
    nl.Trainer(make_model(), tx(), loss_fn=loss_fn).fit(make_batches(), max_steps=2)
    err = capsys.readouterr().err  # stderr is not a terminal under pytest: no bar by default
    assert "step/s" not in err and "2/2" not in err
    assert err.count("nnxloop: Training TinyNet") == 2  # the start lines are there


def test_logging_and_multi_writer(caplog):
    logged = writers.LoggingWriter()
    multi = writers.MultiWriter([logged, writers.MetricWriter()])
    with caplog.at_level(logging.INFO, logger="nnxloop.metrics"):
        multi.write_scalars(3, {"loss": 0.25})
        multi.write_texts(3, {"note": "hello"})
        multi.close()
    assert "step 3: loss=0.25" in caplog.text and "hello" in caplog.text


def test_progress_bar_has_a_total_from_epochs_of_data_with_a_length(capsys):
    nl.Trainer(make_model(), tx(), loss_fn=loss_fn, progress=True, log_every_steps=4).fit(
        make_batches(), epochs=2
    )
    err = capsys.readouterr().err
    assert "24/24" in err and "100%" in err  # 12 batches x 2 epochs, known in advance


def test_progress_bar_shows_the_first_validation_sets_loss(capsys):
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, progress=True, log_every_steps=2)
    sets = {"in_domain": make_batches(1, seed=1), "ood": make_batches(1, seed=2)}
    trainer.fit(make_batches(), val_data=sets, max_steps=4, eval_every_steps=2)
    err = capsys.readouterr().err
    assert "val_in_domain_loss=" in err and "loss=" in err
    assert "val_ood" not in err
    value = trainer.history.evals[-1]["val_in_domain_loss"]
    assert f"val_in_domain_loss={value:.4g}" in err


def test_progress_bar_on_a_terminal_that_reports_no_size(monkeypatch):
    import os
    import select

    leader, follower = os.openpty()  # a pseudo-terminal with no size set: 0 columns
    stream = os.fdopen(follower, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        nl.Trainer(make_model(), tx(), loss_fn=loss_fn, progress=True, log_every_steps=4).fit(
            make_batches(), max_steps=8
        )
        stream.flush()
        out = b""
        while select.select([leader], [], [], 0.5)[0]:
            chunk = os.read(leader, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        stream.close()
        os.close(leader)
    text = out.decode(errors="replace")
    assert "8/8" in text and "step/s" in text, repr(text[-300:])


def test_a_run_says_what_it_trains_where_and_from_which_step(tmp_path, capsys):
    def run(epochs):
        callbacks = [
            nl.CheckpointCallback(tmp_path / "ckpt"),
            nl.MetricsLogger(tmp_path / "logs"),
        ]
        trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=callbacks)
        trainer.fit(make_batches(), epochs=epochs)
        return capsys.readouterr().err

    err = run(1)
    first = err.splitlines()[0]
    assert first.startswith("nnxloop: Training TinyNet (195 parameters) from step 0 on 4 cpu")
    assert "(mesh data=4)" in first
    assert f"checkpoints in {tmp_path / 'ckpt'}" in first
    assert f"logs to {tmp_path / 'logs'}" in first
    table = err.split("nnxloop: Parameters:\n", 1)[1].splitlines()
    assert table[0].split() == ["module", "parameters", "dtype", "layout"]
    assert table[1:4] == [
        "bn              32  float32  replicated",
        "l1             112  float32  replicated",
        "l2              51  float32  replicated",
    ]
    err = run(2)
    assert "Resumed from step 12" in err and "from step 12 on" in err
    assert "Training" not in run(2).replace("Training already finished", "")
    # Quiet: the `nnxloop.run` logger.
    logging.getLogger("nnxloop.run").setLevel(logging.WARNING)
    try:
        assert run(2) == ""
    finally:
        logging.getLogger("nnxloop.run").setLevel(logging.INFO)
