"""The callbacks' view of the trainer: what the shipped callbacks use is there for any callback."""

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import loss_fn, make_batches, make_model

import nnxloop as nl


def test_set_learning_rate_changes_the_next_updates_and_is_checkpointed(tmp_path):
    class Halve(nl.Callback):
        def on_step_end(self, trainer: nl.TrainerView, step, logs):
            if step == 2:
                trainer.set_learning_rate(float(trainer.learning_rate()) / 2)

    def run(*callbacks):
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        trainer = nl.Trainer(
            make_model(),
            opt,
            loss_fn=loss_fn,
            callbacks=[*callbacks, nl.CheckpointCallback(tmp_path / "c", every_steps=4)],
        )
        trainer.fit(make_batches(), max_steps=4)
        return trainer

    assert float(run(Halve()).learning_rate()) == pytest.approx(0.05)
    resumed = run()  # the finished run, restored from its checkpoint
    assert float(resumed.learning_rate()) == pytest.approx(0.05)
    assert float(resumed.optimizer.opt_state.hyperparams["learning_rate"][...]) == pytest.approx(
        0.05
    )


def test_set_learning_rate_without_injected_hyperparameters_says_what_to_do():
    trainer = nl.Trainer(make_model(), optax.sgd(0.1), loss_fn=loss_fn)
    assert trainer.learning_rate() is None
    with pytest.raises(ValueError, match="inject_hyperparams"):
        trainer.set_learning_rate(0.01)


class NumberedTrainer(nl.Trainer):
    """A train step that sees its update's number and key, without hiding them in the model."""

    def train_step(self, model, optimizer, batch, step: nl.Step):
        metrics = super().train_step(model, optimizer, batch)
        draw = jax.random.uniform(step.key)
        return {**metrics, "number": step.number.astype(jnp.float32), "draw": draw}


class Seen(nl.Callback):
    def __init__(self):
        self.numbers, self.draws = {}, {}

    def on_step_end(self, trainer, step, logs):
        self.numbers[step] = float(logs["number"])
        self.draws[step] = float(logs["draw"])


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_a_train_step_may_take_its_update_number_and_key(k, tmp_path):
    seen = Seen()
    trainer = NumberedTrainer(
        make_model(), optax.adam(1e-2), loss_fn=loss_fn, callbacks=[seen], steps_per_dispatch=k
    )
    trainer.fit(make_batches(4), max_steps=6)
    assert seen.numbers == {s: float(s) for s in range(1, 7)}
    assert len(set(seen.draws.values())) == 6  # a key of its own for each update
    # A run resumed from a checkpoint at step 4 numbers and draws the same.
    resumed = Seen()
    for callbacks, steps in (([], 4), ([resumed], 6)):
        NumberedTrainer(
            make_model(),
            optax.adam(1e-2),
            loss_fn=loss_fn,
            callbacks=[*callbacks, nl.CheckpointCallback(tmp_path / "c", every_steps=2)],
            steps_per_dispatch=k,
        ).fit(make_batches(4), max_steps=steps)
    assert resumed.numbers == {5: 5.0, 6: 6.0}
    assert resumed.draws == {5: seen.draws[5], 6: seen.draws[6]}
