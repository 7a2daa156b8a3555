"""The callbacks' view of the trainer: what the shipped callbacks use is there for any callback."""

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
