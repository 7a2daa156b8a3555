import time

import jax
import numpy as np
import optax
import pytest
from conftest import TinyNet, leaves_of, loss_fn, make_batches, make_model, tx
from flax import nnx

import nnxloop as nl
from nnxloop._protocol.callback import CallbackList
from nnxloop._run import totals


def test_fit_learns_and_reports_floats(batches, val_batches):
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    history = trainer.fit(batches, val_data=val_batches, epochs=3)
    assert trainer.step == 3 * len(batches)
    assert trainer.epoch == 3
    assert [e["epoch"] for e in history.epochs] == [0, 1, 2]
    for entry in history.epochs:
        assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(entry)
        assert all(isinstance(v, float) for k, v in entry.items() if k != "epoch")
    assert history["loss"][-1] < history["loss"][0]
    assert [e["step"] for e in history.evals] == [12, 24, 36]


def test_epoch_metrics_average_every_step(batches):
    losses, seen = [], {}

    class Record(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            losses.append(float(logs["loss"]))

        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1:  # epoch 0's averages are first read when fit ends
                seen[epoch] = logs["loss"]
                logs["mine"] = 1.0  # a callback's own entry stays out of the History

    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, callbacks=[Record()], steps_per_dispatch=4
    )
    history = trainer.fit(batches, epochs=2)
    n = len(batches)
    assert history["loss"] == pytest.approx([np.mean(losses[:n]), np.mean(losses[n:])], rel=1e-5)
    assert seen[1] == history["loss"][1]
    assert all(type(e) is dict for e in history.epochs)
    assert "mine" not in history.epochs[1]


@pytest.mark.parametrize("k", [1, 2])
def test_each_epoch_accumulator_is_read_from_the_device_once(monkeypatch, k):
    # A device that lags behind the host: no accumulator is ready when an epoch ends, so
    # every epoch's averages are read at the end of fit. Reading each epoch's float32 sums
    # once (not once per later epoch that still holds it) keeps that O(epochs), also when a
    # callback takes (and reads) totals of its own over the same steps.
    monkeypatch.setattr(totals._Sums, "ready", lambda self: self.host is not None)
    read, device_get = [], jax.device_get

    def counting_device_get(xs):
        read.extend(x for x in xs if isinstance(x, tuple) and isinstance(x[0], dict))
        return device_get(xs)

    monkeypatch.setattr(totals.jax, "device_get", counting_device_get)
    losses, windows = [], []

    class Record(nl.Callback):
        def on_epoch_begin(self, trainer, epoch):
            self.start = trainer.metric_totals()

        def on_step_end(self, trainer, step, logs):
            losses.append(float(logs["loss"]))
            end = trainer.metric_totals()
            if step % 2 == 0:  # the epoch's last step: this window is the epoch
                windows.append(end.average_since(self.start)["loss"])

    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=loss_fn, steps_per_dispatch=k, callbacks=[Record()]
    )
    history = trainer.fit(make_batches(n_batches=2), epochs=10)
    assert len(read) == 10
    expected = [np.mean(losses[i : i + 2]) for i in range(0, 20, 2)]
    assert history["loss"] == pytest.approx(expected, rel=1e-5)
    assert windows == pytest.approx(history["loss"], rel=1e-9)


def test_exactly_one_of_epochs_and_max_steps(batches):
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    with pytest.raises(ValueError, match="exactly one of epochs"):
        trainer.fit(batches)
    with pytest.raises(ValueError, match="exactly one of epochs"):
        trainer.fit(batches, epochs=1, max_steps=3)
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        trainer.fit(batches, max_steps=0)


def test_totals_count_from_start_of_training(batches):
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    trainer.fit(batches, max_steps=5)
    assert trainer.step == 5
    trainer.fit(batches, max_steps=20)
    assert trainer.step == 20
    # an epoch cut short by max_steps is finished by an epoch-based call
    trainer.fit(batches, epochs=2)
    assert (trainer.step, trainer.epoch) == (24, 2)
    trainer.fit(batches, epochs=2)  # already there: nothing to do
    assert trainer.step == 24


def test_no_retrace_across_steps_or_fit_calls(batches):
    traces = []

    class Counting(nl.Trainer):
        def train_step(self, model, optimizer, batch):
            traces.append(1)  # Python side effect: runs only when the step is traced
            return super().train_step(model, optimizer, batch)

    trainer = Counting(make_model(), tx(), loss_fn=loss_fn)
    trainer.fit(batches, max_steps=3)
    first = len(traces)  # the metric-discovery trace and the compile's trace
    trainer.fit(batches, max_steps=6)
    trainer.fit(batches, epochs=2)
    assert first == 2
    assert len(traces) == first


def test_no_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="pass loss_fn"):
        nl.Trainer(make_model(), tx())


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        nl.Trainer(object(), tx(), loss_fn=loss_fn)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        nl.Trainer(make_model(), "adam", loss_fn=loss_fn)
    with pytest.raises(ValueError, match="steps_per_dispatch must be a positive int"):
        nl.Trainer(make_model(), tx(), loss_fn=loss_fn, steps_per_dispatch=0)


def test_train_mode_updates_batch_stats_and_eval_is_deterministic(batches):
    model = make_model()
    mean_before = np.asarray(model.bn.mean[...]).copy()
    trainer = nl.Trainer(model, tx(), loss_fn=loss_fn)
    trainer.fit(batches, max_steps=4)
    assert not np.allclose(np.asarray(trainer.model.bn.mean[...]), mean_before)
    first = trainer.evaluate(batches[:2])
    second = trainer.evaluate(batches[:2])
    assert first == second
    # evaluation neither moves batch statistics nor consumes dropout randomness
    np.testing.assert_array_equal(
        np.asarray(trainer.model.bn.mean[...]), np.asarray(model.bn.mean[...])
    )


def test_dropout_is_on_in_training():
    class Probe(nl.Trainer):
        def train_step(self, model, optimizer, batch):
            out = model.drop(jax.numpy.ones((4, 8)))
            return {"zeros": (out == 0).mean()}

    trainer = Probe(make_model(), tx())
    zeros = []

    class Record(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            zeros.append(float(logs["zeros"]))

    trainer.callbacks = CallbackList([Record()])
    trainer.fit(make_batches(2), max_steps=2)
    assert all(z > 0 for z in zeros)


def test_evaluate_averages_over_whole_set_weighted_by_batch_size():
    data = make_batches(n_batches=2, batch=16) + make_batches(n_batches=1, batch=4, seed=5)
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    metrics = trainer.evaluate(data)
    model = trainer.model
    model.eval()
    x = np.concatenate([b["x"] for b in data])
    y = np.concatenate([b["y"] for b in data])
    logits = model(x)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert set(metrics) == {"loss", "accuracy"}


def test_predict_concatenates_and_needs_override_for_dicts(batches):
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    out = trainer.predict([b["x"] for b in batches[:3]])
    assert out.shape == (48, 3)
    out = trainer.predict([(b["x"], b["y"]) for b in batches[:2]])
    assert out.shape == (32, 3)
    with pytest.raises(TypeError, match="override Trainer.predict_step"):
        trainer.predict(batches[:1])


def test_model_reflects_training_and_is_usable_after_fit(batches):
    model = make_model()
    before = leaves_of(model)
    trainer = nl.Trainer(model, tx(), loss_fn=loss_fn)
    trainer.fit(batches, max_steps=3)
    assert trainer.model is model
    after = leaves_of(model)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    model.eval()
    assert model(batches[0]["x"]).shape == (16, 3)  # arrays still alive, not donated away
    assert int(trainer.optimizer.step[...]) == 3


def test_user_edits_between_fits_are_picked_up(batches):
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    trainer.fit(batches, max_steps=2)
    zeros = jax.tree.map(np.zeros_like, nnx.state(trainer.model, nnx.Param))
    nnx.update(trainer.model, zeros)
    trainer.fit(batches, max_steps=2)  # no steps: state passes through unchanged
    assert all(not np.any(leaf) for leaf in leaves_of(trainer.model))


def test_seed_makes_dropout_reproducible(batches):
    def run(model_seed, seed):
        trainer = nl.Trainer(TinyNet(nnx.Rngs(model_seed)), tx(), loss_fn=loss_fn, seed=seed)
        trainer.fit(batches, max_steps=3)
        return leaves_of(trainer.model)

    a, b = run(0, 7), run(0, 7)
    c = run(0, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.slow
def test_optax_chain_schedule_and_multisteps(batches):
    schedule = optax.linear_schedule(1e-2, 0.0, 20)
    for opt in (
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)),
        optax.MultiSteps(optax.sgd(1e-2), every_k_schedule=2),
    ):
        trainer = nl.Trainer(make_model(), opt, loss_fn=loss_fn)
        trainer.fit(batches, max_steps=4)
        assert trainer.step == 4


def test_arrays_the_user_holds_survive_fit(batches):
    model = make_model()
    kernel, key = model.l1.kernel[...], model.drop.rngs.key[...]
    trainer = nl.Trainer(model, tx(), loss_fn=loss_fn)  # 4 devices: state is copied, sharded
    trainer.fit(batches, max_steps=3)
    assert not kernel.is_deleted() and not key.is_deleted()
    np.asarray(kernel)


def test_model_committed_to_one_device_trains_on_the_mesh(batches):
    model = make_model()
    # as a model loaded from disk or moved by hand would be: its arrays committed to device 0
    nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), nnx.state(model)))
    kernel = model.l1.kernel[...]
    assert kernel.committed
    trainer = nl.Trainer(model, tx(), loss_fn=loss_fn)
    trainer.fit(batches, max_steps=2)
    assert trainer.step == 2 and not kernel.is_deleted()


def test_the_host_queues_a_bounded_number_of_dispatches():
    k, steps = 1, 96
    # XLA's CPU client deadlocks once a device has 32 computations queued while a collective
    # waits for it (seen as a hung test suite on 2 cores): the host must stay a bounded number
    # of dispatches ahead. Here each step takes the device ~5 ms and the host nothing.
    done = []

    def executed(index):
        time.sleep(0.005)
        done.append(int(index))

    def slow_loss(model, batch):
        jax.debug.callback(executed, batch["index"][0])
        return loss_fn(model, batch)

    ahead = []

    class Watch(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            ahead.append(step - (max(done) + 1 if done else 0))

    data = make_batches(n_batches=steps)
    for i, batch in enumerate(data):
        batch["index"] = np.full(16, i, np.int32)
    trainer = nl.Trainer(
        make_model(), tx(), loss_fn=slow_loss, steps_per_dispatch=k, callbacks=[Watch()]
    )
    trainer.fit(data, max_steps=steps)
    assert len(set(done)) == steps
    assert max(ahead) <= 16 * k, max(ahead)  # a dozen dispatches and the steps of one
