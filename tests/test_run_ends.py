"""Every way a run ends is part of its state: epochs that end with training, finished runs,
callbacks reused by a new trainer, misconfigurations that would silently do nothing."""

import numpy as np
import optax
import pytest
from conftest import TinyNet, leaves_of, loss_fn, make_batches, make_model, tx
from flax import nnx
from jax._src.array import ArrayImpl

import nnxloop as nl


class Recorder(nl.Callback):
    def __init__(self):
        self.events = []

    def on_epoch_begin(self, trainer, epoch):
        self.events.append(("epoch_begin", epoch))

    def on_step_end(self, trainer, step, logs):
        self.events.append(("step_end", step))

    def on_eval_end(self, trainer, step, metrics):
        self.events.append(("eval_end", step))

    def on_epoch_end(self, trainer, epoch, logs):
        self.events.append(("epoch_end", epoch))


# -- an epoch that ends when training ends is counted --------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_max_steps_on_an_epoch_boundary_ends_and_evaluates_that_epoch(k):
    rec = Recorder()
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[rec], steps_per_dispatch=k)
    history = trainer.fit(make_batches(2), val_data=make_batches(1), max_steps=4)
    assert trainer.step == 4 and trainer.epoch == 2
    assert [e["epoch"] for e in history.epochs] == [0, 1]
    assert "val_loss" in history.epochs[-1]
    assert rec.events[-2:] == [("eval_end", 4), ("epoch_end", 1)]
    # A later fit does not open that epoch again.
    trainer.fit(make_batches(2), max_steps=6)
    assert ("epoch_begin", 1) in rec.events and rec.events.count(("epoch_begin", 1)) == 1


def test_a_stop_on_an_epoch_s_last_step_still_ends_that_epoch():
    class StopAt(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 4:
                trainer.stop_training = True

    rec = Recorder()
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[StopAt(), rec])
    history = trainer.fit(make_batches(2), val_data=make_batches(1), epochs=5)
    assert trainer.step == 4 and trainer.epoch == 2
    assert len(history.epochs) == 2 and history.stopped_early
    assert rec.events[-1] == ("epoch_end", 1)


def test_best_model_sees_the_last_epoch_of_a_max_steps_run(tmp_path):
    best = nl.BestModelCallback(tmp_path / "best", monitor="val_loss", max_to_keep=5)
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[best])
    trainer.fit(make_batches(2), val_data=make_batches(1), max_steps=6)
    assert sorted(s for s, _ in best.kept) == [2, 4, 6]


def test_an_iterator_without_length_ends_its_epoch_when_exhausted():
    class NoLen:
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    trainer.fit(NoLen(make_batches(2)), max_steps=4)
    assert trainer.step == 4 and trainer.epoch == 1  # the loop cannot know epoch 1 is over


# -- seed=None keeps the model's own streams ------------------------------------------------


def test_default_seed_keeps_the_model_s_own_rng_streams():
    def run(dropout_seed):
        model = TinyNet(nnx.Rngs(params=0, dropout=dropout_seed))
        trainer = nl.Trainer(model, tx(), loss_fn=loss_fn)
        trainer.fit(make_batches(4), max_steps=4)
        return leaves_of(trainer.model)

    a, b = run(1), run(2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b)), "the dropout seed was ignored"


def test_an_int_seed_still_reseeds():
    def run(dropout_seed):
        model = TinyNet(nnx.Rngs(params=0, dropout=dropout_seed))
        trainer = nl.Trainer(model, tx(), loss_fn=loss_fn, seed=7)
        trainer.fit(make_batches(4), max_steps=4)
        return leaves_of(trainer.model)

    for x, y in zip(run(1), run(2)):
        np.testing.assert_array_equal(x, y)


# -- a callback reused by a new trainer starts fresh ----------------------------------------


def test_early_stopping_reused_by_fresh_trainers_starts_each_run_fresh():
    stopper = nl.EarlyStopping(monitor="val_loss", patience=2, min_delta=10.0)
    steps = []
    for _ in range(3):
        trainer = nl.Trainer(make_model(), optax.sgd(0.0), loss_fn=loss_fn, callbacks=[stopper])
        trainer.fit(make_batches(1), val_data=make_batches(1), epochs=10)
        steps.append(trainer.step)
    # min_delta 10: no evaluation improves on the first, so each run stops at its 3rd
    assert steps == [3, 3, 3]


def test_best_model_reused_by_a_fresh_trainer_forgets_the_old_ranking(tmp_path):
    best = nl.BestModelCallback(tmp_path / "best", monitor="val_loss")
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[best])
    trainer.fit(make_batches(2), val_data=make_batches(1), epochs=2)
    assert best.kept
    best.store = nl.BestModelCallback(tmp_path / "best2").store
    trainer = nl.Trainer(make_model(), optax.sgd(0.0), loss_fn=loss_fn, callbacks=[best])
    trainer.fit(make_batches(2), val_data=make_batches(1), epochs=1)
    assert [s for s, _ in best.kept] == [2]  # ranked among this run's evaluations only


def test_restored_callback_state_still_carries_on(tmp_path):
    def trainer_with(stopper):
        return nl.Trainer(
            make_model(),
            optax.sgd(0.0),
            loss_fn=loss_fn,
            callbacks=[stopper, nl.CheckpointCallback(tmp_path / "ckpt", every_epochs=1)],
        )

    trainer_with(nl.EarlyStopping(patience=3, min_delta=10.0)).fit(
        make_batches(1), val_data=make_batches(1), epochs=2
    )
    stopper = nl.EarlyStopping(patience=3, min_delta=10.0)
    trainer = trainer_with(stopper)
    trainer.fit(make_batches(1), val_data=make_batches(1), epochs=10)
    assert trainer.step == 4  # waited 1 evaluation before, 2 more now


# -- silent misconfigurations fail at fit start ---------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda d: nl.BestModelCallback(d / "best"), lambda d: nl.EarlyStopping()]
)
def test_monitor_callbacks_without_evaluation_fail_at_fit_start(tmp_path, make):
    callback = make(tmp_path)
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[callback])
    with pytest.raises(ValueError, match="val_data"):
        trainer.fit(make_batches(2), epochs=1)
    assert trainer.step == 0
    assert not (tmp_path / "best").exists()


class TrainStepOnly(nl.Trainer):
    def train_step(self, model, optimizer, batch):
        def loss(model):
            return loss_fn(model, batch)[0]

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return {"loss": value}


def test_a_subclass_with_only_train_step_is_told_what_evaluation_needs():
    trainer = TrainStepOnly(make_model(), tx())
    trainer.fit(make_batches(2), epochs=1)  # training alone works
    with pytest.raises(TypeError, match="eval_step"):
        trainer.evaluate(make_batches(1))
    with pytest.raises(TypeError, match="eval_step"):
        TrainStepOnly(make_model(), tx()).fit(make_batches(2), val_data=make_batches(1), epochs=1)


# -- TerminateOnNaN stops within one dispatch of the NaN ------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_terminate_on_nan_stops_within_one_dispatch_of_the_nan(k, monkeypatch):
    # A device that lags the host: no result is ever found ready without waiting for it.
    monkeypatch.setattr(ArrayImpl, "is_ready", lambda self: False)
    batches = make_batches(10)
    batches[2] = {"x": np.full_like(batches[2]["x"], np.inf), "y": batches[2]["y"]}  # step 3
    stop = nl.TerminateOnNaN()
    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[stop], steps_per_dispatch=k
    )
    trainer.fit(batches, epochs=1)
    assert stop.stopped_at is not None
    nan_dispatch_end = -(-3 // k) * k
    assert 3 <= trainer.step <= nan_dispatch_end + k  # the NaN's dispatch, or the next one


# -- what a user sees by default ------------------------------------------------------------


def test_resume_finish_and_early_stop_are_one_line_each_on_stderr(tmp_path, capfd):
    def run():
        trainer = nl.Trainer(
            make_model(),
            optax.sgd(0.0),
            loss_fn=loss_fn,
            callbacks=[
                nl.EarlyStopping(patience=1, min_delta=10.0),
                nl.CheckpointCallback(tmp_path / "c"),
            ],
        )
        trainer.fit(make_batches(1), val_data=make_batches(1), epochs=5)
        return trainer

    run()
    err = capfd.readouterr().err
    assert "Early stopping at step 2" in err
    run()
    err = capfd.readouterr().err
    assert f"Resumed from step 2 of {tmp_path / 'c'}" in err
    assert "Training already finished at step 2" in err
