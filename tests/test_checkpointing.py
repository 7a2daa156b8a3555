import gc
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaves_of, loss_fn, make_batches, make_model, tx

import nnxloop as nl
from nnxloop import checkpointing


def fit(callbacks, *, max_steps=12, eval_every_steps=4, val=True, model=None, **kwargs):
    trainer = nl.Trainer(
        model or make_model(), tx(), loss_fn=loss_fn, callbacks=callbacks, **kwargs
    )
    history = trainer.fit(
        make_batches(),
        val_data=make_batches(2, seed=1) if val else None,
        max_steps=max_steps,
        eval_every_steps=eval_every_steps if val else None,
    )
    return trainer, history


def steps_in(directory):
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.mark.slow
def test_periodic_saves_retention_and_final_save(tmp_path):
    ckpt = nl.CheckpointCallback(tmp_path, every_steps=5, max_to_keep=2, keep_every_steps=10)
    fit([ckpt], max_steps=23, steps_per_dispatch=4)
    assert steps_in(tmp_path) == [10, 20, 23]


@pytest.mark.slow
def test_default_trigger_is_each_epoch(tmp_path):
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(tmp_path, max_to_keep=None)],
    )
    trainer.fit(make_batches(4), epochs=3)
    assert steps_in(tmp_path) == [4, 8, 12]


def test_every_epochs(tmp_path):
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(tmp_path, every_epochs=2, max_to_keep=None)],
    )
    trainer.fit(make_batches(4), epochs=5)
    assert steps_in(tmp_path) == [8, 16, 20]


def test_resume_restores_everything(tmp_path):
    class Counter(nl.Callback):
        def __init__(self):
            self.count = 0

        def on_step_end(self, trainer, step, logs):
            self.count += 1

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    first, _ = fit([Counter(), nl.CheckpointCallback(tmp_path, every_steps=5)], max_steps=7)
    counter = Counter()
    ckpt = nl.CheckpointCallback(tmp_path, every_steps=5)
    trainer = nl.Trainer(make_model(seed=3), tx(), loss_fn=loss_fn, callbacks=[counter, ckpt])
    trainer.fit(make_batches(), max_steps=7)  # nothing left to do: state comes from disk
    assert ckpt.restored_step == 7
    assert (trainer.step, counter.count) == (7, 7)
    meta = json.loads((tmp_path / "7" / "meta" / "metadata").read_text())
    assert (meta["step"], meta["epoch"], meta["position"]) == (7, 0, 7)
    for a, b in zip(leaves_of(trainer.model), leaves_of(first.model)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        jax.random.key_data(trainer.model.drop.rngs.key[...]),
        jax.random.key_data(first.model.drop.rngs.key[...]),
    )
    assert int(trainer.optimizer.step[...]) == 7


def test_model_item_is_readable_with_plain_orbax(tmp_path):
    fit([nl.CheckpointCallback(tmp_path, every_steps=6)], max_steps=6, val=False)
    # What a user without nnxloop writes, following the Flax docs:
    code = f"""
import orbax.checkpoint as ocp
from flax import nnx
from conftest import make_model
model = make_model(seed=9)
abstract = nnx.state(nnx.eval_shape(lambda: make_model(seed=9)))
with ocp.CheckpointManager({str(tmp_path)!r}) as manager:
    restored = manager.restore(manager.latest_step(),
        args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract)))
nnx.update(model, restored.model)
"""
    namespace = {}
    exec(compile(code, "plain_orbax", "exec"), namespace)
    assert "nnxloop" not in code
    expected = nl.load_model(tmp_path, make_model)
    for a, b in zip(leaves_of(namespace["model"]), leaves_of(expected)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_loaded_model_evaluates_and_trains_on_a_one_device_trainer(tmp_path):
    # load_model places the arrays on a one-device mesh of its own (Explicit axes); a Trainer
    # on a one-device Auto mesh of the same device must still lay them out on its mesh.
    fit([nl.CheckpointCallback(tmp_path, every_steps=4)], max_steps=4, val=False)
    model = nl.load_model(tmp_path, make_model)
    mesh = jax.make_mesh(
        (1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,)
    )
    trainer = nl.Trainer(model, tx(), loss_fn=loss_fn, mesh=mesh)
    before = trainer.evaluate(make_batches(n_batches=2))
    trainer.fit(make_batches(n_batches=2), max_steps=2)
    assert set(before) == {"loss", "accuracy"}
    assert trainer.step == 2


def test_best_model_keeps_best_k_and_nan_is_never_best(tmp_path):
    values = iter([3.0, 1.0, 2.0, float("nan"), 5.0, 0.5, float("inf")])

    class FakeEval(nl.Callback):
        def on_eval_end(self, trainer, step, metrics):
            metrics["val_score"] = next(values)

    best = nl.BestModelCallback(tmp_path, monitor="val_score", mode="min", max_to_keep=2)
    trainer, _ = fit([FakeEval(), best], max_steps=14, eval_every_steps=2)
    assert [s for s, _ in best.kept] == [12, 4]
    assert steps_in(tmp_path) == [4, 12]
    assert best.state_dict() == {"best": 0.5, "kept": [[12, 0.5], [4, 1.0]]}
    model = nl.load_model(tmp_path, make_model, step="best")
    saved_at_12 = nl.load_model(tmp_path, make_model, step=12)
    for a, b in zip(leaves_of(model), leaves_of(saved_at_12)):
        np.testing.assert_array_equal(a, b)


def test_best_model_max_mode_and_restore_on_train_end(tmp_path):
    values = iter([0.1, 0.9, 0.5])

    class FakeEval(nl.Callback):
        def on_eval_end(self, trainer, step, metrics):
            metrics["val_acc"] = next(values)

    best = nl.BestModelCallback(tmp_path, monitor="val_acc", mode="max", restore_on_train_end=True)
    trainer, _ = fit([FakeEval(), best], max_steps=12, eval_every_steps=4)
    assert best.best_step == 8
    expected = nl.load_model(tmp_path, make_model, step=8)
    for a, b in zip(leaves_of(trainer.model), leaves_of(expected)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("best_first", [True, False])
def test_restoring_the_best_weights_never_goes_into_the_final_checkpoint(best_first, tmp_path):
    # The run ends at step 10, which no periodic save (every 4) wrote: the final save writes
    # it. It must hold the weights trained to step 10, wherever the best-model callback stands
    # in the list, while the trainer ends holding the best weights (step 4 here).
    values = iter([0.1, 0.5])

    class FakeEval(nl.Callback):
        def on_eval_end(self, trainer, step, metrics):
            metrics["val_score"] = next(values)

    class LastWeights(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 10:
                self.weights = leaves_of(trainer.model)

    best = nl.BestModelCallback(
        tmp_path / "best", monitor="val_score", mode="min", restore_on_train_end=True
    )
    ckpt = nl.CheckpointCallback(tmp_path / "ckpt", every_steps=4)
    last = LastWeights()
    order = [best, ckpt] if best_first else [ckpt, best]
    trainer, _ = fit([FakeEval(), last, *order], max_steps=10, eval_every_steps=4)
    assert best.best_step == 4 and steps_in(tmp_path / "ckpt")[-1] == 10
    final = nl.load_model(tmp_path / "ckpt", make_model, step=10)
    for a, b in zip(leaves_of(final), last.weights):
        np.testing.assert_array_equal(a, b)
    best_weights = nl.load_model(tmp_path / "best", make_model, step=4)
    for a, b in zip(leaves_of(trainer.model), leaves_of(best_weights)):
        np.testing.assert_array_equal(a, b)


def test_best_state_survives_resume(tmp_path):
    ckpt_dir, best_dir = tmp_path / "ckpt", tmp_path / "best"
    fit(
        [nl.CheckpointCallback(ckpt_dir, every_steps=4), nl.BestModelCallback(best_dir)],
        max_steps=8,
    )
    best = nl.BestModelCallback(best_dir)
    fit([nl.CheckpointCallback(ckpt_dir, every_steps=4), best], max_steps=8)
    assert best.kept and best.best == best.kept[0][1]


def test_missing_monitor_lists_metrics(tmp_path):
    with pytest.raises(KeyError, match=r"only \['val_accuracy', 'val_loss'\]"):
        fit([nl.BestModelCallback(tmp_path, monitor="val_acc")])


def test_directory_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(nl.CheckpointError, match=f"{path} is a file"):
        fit([nl.CheckpointCallback(path)])
    with pytest.raises(nl.CheckpointError, match="cannot be written"):
        fit([nl.CheckpointCallback(path / "sub")])
    assert path.read_text() == "x"


def test_load_model_errors(tmp_path):
    with pytest.raises(nl.CheckpointError, match="does not exist"):
        nl.load_model(tmp_path / "nope", make_model)
    with pytest.raises(nl.CheckpointError, match="No checkpoints in"):
        nl.load_model(tmp_path, make_model)
    fit([nl.CheckpointCallback(tmp_path, every_steps=4)], max_steps=8, val=False)
    with pytest.raises(nl.CheckpointError, match=r"No checkpoint of step 5 .* steps \[4, 8\]"):
        nl.load_model(tmp_path, make_model, step=5)
    with pytest.raises(nl.CheckpointError, match="no checkpoint ranked by a BestModelCallback"):
        nl.load_model(tmp_path, make_model, step="best")
    from conftest import TinyNet
    from flax import nnx

    with pytest.raises(
        nl.CheckpointError,
        match=r"leaf \['bn'\]\['bias'\].value has shape \(16,\) in the checkpoint but \(8,\)",
    ):
        nl.load_model(tmp_path, lambda: TinyNet(nnx.Rngs(0), hidden=8))


def test_resume_into_another_architecture_names_the_leaf(tmp_path):
    from conftest import TinyNet
    from flax import nnx

    fit([nl.CheckpointCallback(tmp_path, every_steps=4)], max_steps=4, val=False)
    with pytest.raises(nl.CheckpointError, match=r"leaf \['bn'\]\['bias'\].value has shape"):
        fit([nl.CheckpointCallback(tmp_path)], val=False, model=TinyNet(nnx.Rngs(0), hidden=8))
    assert steps_in(tmp_path) == [4]  # nothing lost


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    fit([nl.CheckpointCallback(tmp_path, every_steps=4, max_to_keep=None)], max_steps=8, val=False)
    data_files = [
        os.path.join(root, name)
        for root, _, names in os.walk(tmp_path / "8" / "model")
        for name in names
        if "/d/" in os.path.join(root, name) + "/" or root.endswith("/d")
    ]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(3)
    ckpt = nl.CheckpointCallback(tmp_path, every_steps=4, max_to_keep=None)
    with caplog.at_level(logging.WARNING, logger="nnxloop"):
        trainer, _ = fit([ckpt], max_steps=8, val=False)
    gc.collect()
    assert ckpt.restored_step == 4
    assert "step 8" in caplog.text and "unreadable" in caplog.text
    assert trainer.step == 8
    assert steps_in(tmp_path) == [4, 8]  # step 8 re-saved by the resumed run
    assert any(name.startswith("8.unreadable") for name in os.listdir(tmp_path))  # kept aside


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_non_finite_state_is_never_saved_and_keeps_the_last_good_one(tmp_path, async_, caplog):
    batches = make_batches()
    for batch in batches[5:]:  # from step 6 on, the loss overflows and SGD writes inf/NaN
        batch["x"] = batch["x"] * 1e30
    callbacks = [nl.CheckpointCallback(tmp_path, every_steps=2, max_to_keep=1)]
    if async_:
        callbacks.append(nl.AsyncSaveCallback())
    trainer = nl.Trainer(make_model(), optax.sgd(1.0), loss_fn=loss_fn, callbacks=callbacks)
    trainer.fit(batches, max_steps=10)
    # Steps 6, 8 and 10 were refused; the finite step 4 was not evicted by max_to_keep=1.
    assert os.listdir(tmp_path) == ["4"]
    ours = [r.message for r in caplog.records if r.name == "nnxloop"]
    assert [m.split()[3] for m in ours if m.startswith("Not saving")] == ["6:", "8:", "10:"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no orbax tracebacks
    assert all(np.isfinite(x).all() for x in leaves_of(nl.load_model(tmp_path, make_model)))


def test_refusals_are_blamed_on_their_own_step_with_several_saves_in_flight(tmp_path):
    class PoisonStep4(nl.Callback):  # only the state saved at step 4 is non-finite
        def on_step_end(self, trainer, step, logs):
            if step == 4:
                self.good = [jax.numpy.copy(x) for x in trainer.engine.leaves]
                trainer.engine.set_leaves(
                    [x * np.nan if jnp.issubdtype(x.dtype, jnp.floating) else x for x in self.good]
                )

    class Heal(nl.Callback):
        def __init__(self, poison):
            self.poison = poison

        def on_step_end(self, trainer, step, logs):
            if step == 4:
                trainer.engine.set_leaves(self.poison.good)

    poison = PoisonStep4()
    ckpt = nl.CheckpointCallback(tmp_path, every_steps=2, max_to_keep=None)
    callbacks = [poison, ckpt, Heal(poison), nl.AsyncSaveCallback(max_in_flight=2)]
    trainer, _ = fit(callbacks, max_steps=10, val=False)
    assert os.listdir(tmp_path) and steps_in(tmp_path) == [2, 6, 8, 10]
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]


def test_best_model_forgets_a_refused_async_save(tmp_path):
    best = nl.BestModelCallback(tmp_path, monitor="val_score", mode="max", max_to_keep=2)

    class Poison(nl.Callback):  # the state at step 8 is ranked best, then found non-finite
        def on_eval_end(self, trainer, step, metrics):
            metrics["val_score"] = float(step)
            if step == 8:
                leaves = trainer.engine.leaves
                trainer.engine.set_leaves(
                    [x * np.nan if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
                )

    fit([Poison(), best, nl.AsyncSaveCallback()], max_steps=8, eval_every_steps=4)
    assert [s for s, _ in best.kept] == [4]
    assert steps_in(tmp_path) == [4]


def test_async_background_failure_names_the_step(tmp_path, monkeypatch):
    original = checkpointing.CheckpointStore.wait

    def failing_wait(self):
        original(self)
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.CheckpointStore, "wait", failing_wait)
    with pytest.raises(nl.CheckpointError, match=r"step 4 .* failed in the background.*disk full"):
        fit(
            [nl.CheckpointCallback(tmp_path, every_steps=4), nl.AsyncSaveCallback()],
            max_steps=12,
            val=False,
        )


def test_async_saves_all_finish_before_fit_returns(tmp_path):
    class Boom(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 9:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            [
                nl.CheckpointCallback(tmp_path, every_steps=4),
                nl.AsyncSaveCallback(max_in_flight=2),
                Boom(),
            ],
            max_steps=12,
            val=False,
        )
    assert steps_in(tmp_path) == [4, 8]
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]
    nl.load_model(tmp_path, make_model, step=8)


@pytest.mark.slow
def test_every_secs_saves_at_dispatch_boundaries_without_regrouping(tmp_path):
    ckpt = nl.CheckpointCallback(tmp_path, every_secs=1e-9, max_to_keep=None)
    fit([ckpt], max_steps=12, val=False, steps_per_dispatch=4)
    assert steps_in(tmp_path) == [4, 8, 12]


def test_bad_trigger_values():
    with pytest.raises(ValueError, match="every_steps must be a positive int"):
        nl.CheckpointCallback("x", every_steps=0)
    with pytest.raises(ValueError, match="max_to_keep must be a positive int"):
        nl.CheckpointCallback("x", max_to_keep=0)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        nl.BestModelCallback("x", mode="auto")


def test_resume_false_refuses_a_directory_with_checkpoints(tmp_path):
    fit([nl.CheckpointCallback(tmp_path, every_steps=4)], max_steps=4, val=False)
    with pytest.raises(nl.CheckpointError, match=r"already holds checkpoints \(steps \[4\]\)"):
        fit([nl.CheckpointCallback(tmp_path, resume=False)], max_steps=4, val=False)
    assert steps_in(tmp_path) == [4]
    # a second fit of the same trainer continues its own run in its own directory
    fresh = nl.CheckpointCallback(tmp_path / "fresh", every_steps=2, resume=False)
    trainer, _ = fit([fresh], max_steps=2, val=False)
    trainer.fit(make_batches(), max_steps=4)
    assert steps_in(tmp_path / "fresh") == [2, 4]


@pytest.mark.slow
def test_grain_loader_state_resumes_in_place(tmp_path, caplog):
    import grain

    source = [{"x": b["x"][i], "y": b["y"][i]} for b in make_batches(4) for i in range(16)]

    def loader():
        return grain.DataLoader(
            data_source=source,
            sampler=grain.samplers.IndexSampler(len(source), shuffle=True, seed=0, num_epochs=1),
            operations=[grain.transforms.Batch(8, drop_remainder=True)],
            worker_count=0,
        )

    def run(directory, max_steps):
        trainer = nl.Trainer(
            make_model(),
            tx(),
            loss_fn=loss_fn,
            callbacks=[nl.CheckpointCallback(directory, every_steps=3)],
        )
        trainer.fit(loader(), max_steps=max_steps)
        return leaves_of(trainer.model)

    reference = run(tmp_path / "a", 7)
    run(tmp_path / "b", 3)
    with caplog.at_level(logging.INFO, logger="nnxloop"):
        resumed = run(tmp_path / "b", 7)
    assert "skipped" not in caplog.text  # the loader's own state put it in place
    for a, b in zip(resumed, reference):
        np.testing.assert_array_equal(a, b)
