import numpy as np
import pytest
from conftest import loss_fn, make_batches, make_model, tx

import nnxloop as nl
from nnxloop._protocol.callback import CallbackList


class Recorder(nl.Callback):
    def __init__(self, name, events):
        self.name, self.events = name, events

    def on_train_begin(self, trainer):
        self.events.append((self.name, "train_begin"))

    def on_epoch_begin(self, trainer, epoch):
        self.events.append((self.name, "epoch_begin", epoch))

    def on_step_end(self, trainer, step, logs):
        self.events.append((self.name, "step_end", step))

    def on_eval_end(self, trainer, step, metrics):
        self.events.append((self.name, "eval_end", step, tuple(sorted(metrics))))

    def on_epoch_end(self, trainer, epoch, logs):
        self.events.append((self.name, "epoch_end", epoch))

    def on_train_end(self, trainer):
        self.events.append((self.name, "train_end"))

    def on_exception(self, trainer, exc):
        self.events.append((self.name, "exception", type(exc).__name__))


def test_event_order_and_list_order():
    events = []
    callbacks = [Recorder("a", events), Recorder("b", events)]
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=callbacks)
    trainer.fit(make_batches(2), val_data=make_batches(1), epochs=2)
    val = ("val_accuracy", "val_loss")
    expected = []
    for event in [
        ("train_begin",),
        ("epoch_begin", 0),
        ("step_end", 1),
        ("step_end", 2),
        ("eval_end", 2, val),
        ("epoch_end", 0),
        ("epoch_begin", 1),
        ("step_end", 3),
        ("step_end", 4),
        ("eval_end", 4, val),
        ("epoch_end", 1),
        ("train_end",),
    ]:
        expected += [("a", *event), ("b", *event)]
    assert events == expected


def test_stop_training_ends_after_current_step():
    class StopAt(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 5:
                trainer.stop_training = True

    events = []
    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[StopAt(), Recorder("r", events)]
    )
    history = trainer.fit(make_batches(), epochs=3)
    assert trainer.step == 5
    assert history.stopped_early and not history.preempted
    assert events[-1] == ("r", "train_end")
    assert ("r", "step_end", 6) not in events


def test_stop_training_lands_exactly_with_steps_per_dispatch():
    class StopAt(nl.Callback):
        def next_step(self, trainer, step):
            return 6

        def on_step_end(self, trainer, step, logs):
            if step == 6:
                assert trainer.state_is_current
                trainer.stop_training = True

    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[StopAt()], steps_per_dispatch=4
    )
    trainer.fit(make_batches(), epochs=3)
    assert trainer.step == 6


def test_on_exception_fires_then_error_propagates():
    class Boom(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 2:
                raise RuntimeError("boom")

    events = []
    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[Boom(), Recorder("r", events)]
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(make_batches(), epochs=1)
    assert events[-1] == ("r", "exception", "RuntimeError")
    assert ("r", "train_end") not in events


def test_step_hook_only_dispatched_to_overriders():
    class EpochOnly(nl.Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            pass

    rec = Recorder("r", [])
    callbacks = CallbackList([EpochOnly(), rec])
    assert callbacks.step_end == [rec]


def test_logs_stay_on_device_until_read():
    seen = []

    class Peek(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            seen.append(type(logs["loss"]).__module__)

    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[Peek()], steps_per_dispatch=2
    )
    trainer.fit(make_batches(4), max_steps=4)
    assert seen and all(m.startswith("jax") for m in seen)


def test_callbacks_must_be_callbacks():
    with pytest.raises(TypeError, match="nnxloop.Callback"):
        nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[print])


def test_eval_every_steps_lands_on_requested_steps():
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, steps_per_dispatch=4)
    history = trainer.fit(
        make_batches(), val_data=make_batches(1), max_steps=20, eval_every_steps=6
    )
    assert [e["step"] for e in history.evals] == [6, 12, 18]
    assert np.isfinite(history["val_loss"]).all()


def test_several_validation_sets_are_named_in_every_metric():
    sets = {"in_domain": make_batches(2, seed=1), "ood": make_batches(3, seed=2)}
    early = nl.EarlyStopping(monitor="val_ood_loss", patience=100)
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, callbacks=[early], progress=False)
    history = trainer.fit(make_batches(), val_data=sets, epochs=2)
    last = history.epochs[-1]
    for name, data in sets.items():
        expected = trainer.evaluate(data)  # plain names, as Keras's evaluate
        assert last[f"val_{name}_loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert last[f"val_{name}_accuracy"] == pytest.approx(expected["accuracy"], rel=1e-6)
    assert "val_loss" not in last
    assert early.best == min(history["val_ood_loss"])  # a monitor watches any of them


def test_a_single_batch_or_bad_names_as_val_data_say_what_to_pass():
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, progress=False)
    batch = make_batches(1)[0]
    with pytest.raises(TypeError, match="looks like a single batch"):
        trainer.fit(make_batches(), val_data=batch, max_steps=1)
    with pytest.raises(ValueError, match="not one; use names like"):
        trainer.fit(make_batches(), val_data={"in domain": make_batches(1)}, max_steps=1)
    with pytest.raises(ValueError, match="empty mapping"):
        trainer.fit(make_batches(), val_data={}, max_steps=1)
    assert trainer.step == 0
