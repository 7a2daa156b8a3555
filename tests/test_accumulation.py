"""Gradient accumulation: `Trainer(gradient_accumulation_steps=N)` makes one optimizer update
from N consecutive batches, inside the compiled step."""

import logging

import jax
import numpy as np
import pytest
from conftest import PlainMLP, TinyNet, loss_fn, make_batches, sgd
from flax import nnx
from jax.sharding import AxisType
from parallel_models import ColumnRowMLP
from parallel_models import loss_fn as parallel_loss_fn

import nnxloop as nl

MLP = PlainMLP  # 6-32-3


def concatenated(batches, n):
    return [
        jax.tree.map(lambda *xs: np.concatenate(xs), *batches[i : i + n])
        for i in range(0, len(batches), n)
    ]


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize(
    "steps_per_dispatch, stage_data", [(1, False), (1, True), (2, False), (2, True)]
)
def test_four_batches_of_16_update_as_one_batch_of_64(steps_per_dispatch, stage_data):
    small = make_batches(n_batches=16, batch=16)
    whole = nl.Trainer(MLP(nnx.Rngs(0)), sgd(), loss_fn=loss_fn, progress=False)
    whole_history = whole.fit(concatenated(small, 4), epochs=2)
    accumulated = nl.Trainer(
        MLP(nnx.Rngs(0)),
        sgd(),
        loss_fn=loss_fn,
        gradient_accumulation_steps=4,
        steps_per_dispatch=steps_per_dispatch,
        stage_data=stage_data,
        progress=False,
    )
    history = accumulated.fit(small, epochs=2)

    assert accumulated.step == whole.step == 8  # optimizer updates, not batches
    assert int(accumulated.optimizer.step[...]) == 8
    assert accumulated.examples_seen == whole.examples_seen == 2 * 16 * 16
    for a, b in zip(params(accumulated.model), params(whole.model)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    # Training metrics are the means over each update's micro-batches: the whole batch's.
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(history[name], whole_history[name], rtol=1e-5)


def test_batch_statistics_and_dropout_are_carried_from_micro_batch_to_micro_batch():
    """A model with BatchNorm and Dropout: after one update of N micro-batches, its batch
    statistics are those of N forward passes in order, and each micro-batch draws new dropout
    masks (the RNG count advances N times)."""
    batches = make_batches(n_batches=4, batch=16)
    trainer = nl.Trainer(
        TinyNet(nnx.Rngs(0)), sgd(), loss_fn=loss_fn, gradient_accumulation_steps=4
    )
    trainer.fit(batches, max_steps=1)

    by_hand = TinyNet(nnx.Rngs(0))
    by_hand.train()
    for b in batches:
        by_hand(b["x"])  # the parameters change only after all four
    got, want = nnx.state(trainer.model, nnx.BatchStat), nnx.state(by_hand, nnx.BatchStat)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    counts = [int(c[...]) for c in jax.tree.leaves(nnx.state(trainer.model, nnx.RngCount))]
    assert counts == [int(c[...]) for c in jax.tree.leaves(nnx.state(by_hand, nnx.RngCount))]


@pytest.mark.parametrize("stage_data", [None, False])
def test_updates_land_where_asked_and_a_short_epoch_end_is_left_out(caplog, stage_data):
    """10 batches, 4 per update: 2 updates an epoch, the last 2 batches left out, with one
    warning for the whole fit; evaluations, stops and callbacks count updates."""
    seen = []

    class Steps(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            seen.append(step)

    trainer = nl.Trainer(
        MLP(nnx.Rngs(0)),
        sgd(),
        loss_fn=loss_fn,
        gradient_accumulation_steps=4,
        callbacks=[Steps()],
        progress=False,
        stage_data=stage_data,
    )
    with caplog.at_level(logging.WARNING, logger="nnxloop"):
        history = trainer.fit(
            make_batches(n_batches=10, batch=16),
            val_data=make_batches(2, seed=1),
            epochs=3,
            eval_every_steps=5,
        )
    assert seen == [1, 2, 3, 4, 5, 6]
    assert trainer.step == 6 and trainer.epoch == 3
    assert [e["step"] for e in history.evals] == [5]
    assert trainer.examples_seen == 6 * 4 * 16
    warnings = [r.getMessage() for r in caplog.records if "too few for an update" in r.message]
    assert len(warnings) == 1 and "2 batches" in warnings[0], warnings


def test_iterator_data_accumulates_like_a_list():
    """A grain dataset (pulled batch by batch, resumable by its iterator state) gives the same
    updates as the staged list."""
    import grain

    batches = make_batches(n_batches=12, batch=16)
    results = []
    for data in (batches, grain.MapDataset.source(batches).map(lambda b: b)):
        trainer = nl.Trainer(
            MLP(nnx.Rngs(0)), sgd(), loss_fn=loss_fn, gradient_accumulation_steps=3
        )
        trainer.fit(data, max_steps=7, eval_every_steps=None)
        assert trainer.step == 7
        results.append(params(trainer.model))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_accumulation_composes_with_a_model_parallel_mesh():
    """On a data x model mesh, with parameters sharded over `model`, two micro-batches of 16
    give the update one batch of 32 gives."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    batches = make_batches(n_batches=8, batch=16)
    results = []
    for n, data in ((1, concatenated(batches, 2)), (2, batches)):
        with jax.set_mesh(mesh):
            model = ColumnRowMLP(nnx.Rngs(0))
        trainer = nl.Trainer(
            model, sgd(), loss_fn=parallel_loss_fn, mesh=mesh, gradient_accumulation_steps=n
        )
        trainer.fit(data, epochs=1)
        assert trainer.step == 4
        kernel = nnx.state(trainer.model, nnx.Param)
        assert any("model" in str(x.sharding.spec) for x in jax.tree.leaves(kernel))
        results.append(params(trainer.model))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_bad_uses_say_what_to_do():
    class OwnStep(nl.Trainer):
        def train_step(self, model, optimizer, batch):
            return {}

    with pytest.raises(ValueError, match="overrides it: override loss_fn instead"):
        OwnStep(MLP(nnx.Rngs(0)), sgd(), gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be a positive int"):
        nl.Trainer(MLP(nnx.Rngs(0)), sgd(), loss_fn=loss_fn, gradient_accumulation_steps=0)

    trainer = nl.Trainer(MLP(nnx.Rngs(0)), sgd(), loss_fn=loss_fn, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="has 3 batches, fewer than one update"):
        trainer.fit(make_batches(n_batches=3), epochs=1)
    uneven = make_batches(n_batches=3, batch=16) + make_batches(n_batches=1, batch=8)
    with pytest.raises(ValueError, match="batches of one accumulated update differ"):
        trainer.fit(uneven, epochs=1)
    assert trainer.step == 0
    with pytest.raises(ValueError, match="needs the 4 batches of one update"):
        trainer.step_memory(make_batches(n_batches=2))


@pytest.mark.slow
def test_killed_accumulating_runs_resume_bitwise(tmp_path):
    """Killed mid-run (anywhere, a save step included) and rerun: the same state, bit for bit,
    as a run never stopped, with updates of three batches from a resumable grain iterator."""
    import random

    from kill_and_rerun import final_state, run_and_kill, run_to_end

    reference_dir = tmp_path / "uninterrupted"
    reference_dir.mkdir()
    run_to_end(reference_dir, "accumulate")
    workdir = tmp_path / "killed"
    workdir.mkdir()
    rng = random.Random("accumulate-kills")
    kill_after = rng.randrange(4, 11)  # 12 updates in all, saved every 3
    run_and_kill(workdir, "accumulate", kill_after, delay=rng.uniform(0.0, 0.03))
    assert run_to_end(workdir, "accumulate") > 0, "the rerun started from scratch"
    got, want = final_state(workdir), final_state(reference_dir)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.slow
def test_only_one_micro_batch_of_activations_is_in_memory_at_a_time():
    """XLA's memory analysis of the compiled steps (compiled, not run), on a model whose
    activations outweigh its parameters and inputs: the step of 8 micro-batches needs no more
    than the step of one plus one gradient-sized accumulator and the 8 inputs, far less than
    8 micro-batches' activations."""

    class Wide(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(16, 1024, rngs=rngs)
            self.l2 = nnx.Linear(1024, 1024, rngs=rngs)
            self.l3 = nnx.Linear(1024, 3, rngs=rngs)

        def __call__(self, x):
            return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    batches = make_batches(n_batches=8, batch=512, din=16)
    peaks, temps = {}, {}
    for n in (1, 8):
        trainer = nl.Trainer(
            Wide(nnx.Rngs(0)), sgd(), loss_fn=loss_fn, gradient_accumulation_steps=n
        )
        m = trainer.step_memory(batches[:n])
        peaks[n] = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
        temps[n] = m.temp_size_in_bytes
    devices = trainer.mesh.shape["data"]
    grads = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param)))
    inputs = sum(x.nbytes for x in jax.tree.leaves(batches[0])) // devices
    assert peaks[8] <= peaks[1] + grads + 8 * inputs, (peaks, grads, inputs)
    # Eight micro-batches' activations at once would need about 8x the temporaries.
    assert temps[8] < 2 * temps[1], temps


def test_resuming_with_another_accumulation_is_refused_and_the_checkpoint_kept(tmp_path):
    """A checkpoint's place in its epoch counts updates of N batches: a rerun with another N
    would silently train on other data. It is refused, saying what to do, and nothing is lost."""
    batches = make_batches(n_batches=8)

    def trainer(n):
        return nl.Trainer(
            MLP(nnx.Rngs(0)),
            sgd(),
            loss_fn=loss_fn,
            gradient_accumulation_steps=n,
            callbacks=[nl.CheckpointCallback(tmp_path / "ckpt", every_steps=1)],
        )

    trainer(4).fit(batches, max_steps=1)  # mid-epoch: update 1 of 2
    with pytest.raises(nl.CheckpointError, match="gradient_accumulation_steps=4"):
        trainer(2).fit(batches, max_steps=4)
    resumed = trainer(4)
    resumed.fit(batches, max_steps=2)
    assert resumed.step == 2
