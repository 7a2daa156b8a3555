"""`Trainer(ema_decay=...)`: a moving average of the weights, kept by the optimizer (flax's
`nnx.EMA`), updated in the compiled step, checkpointed, evaluated and loadable."""

import jax
import numpy as np
import pytest
from conftest import PlainMLP, loss_fn, make_batches, sgd
from flax import nnx

import nnxloop as nl


def MLP(rngs):
    return PlainMLP(rngs, hidden=16)


def arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_average_follows_the_flax_loop_and_is_evaluated():
    batches = make_batches(n_batches=8)
    val = make_batches(2, seed=1)
    trainer = nl.Trainer(
        MLP(nnx.Rngs(0)), sgd(), loss_fn=loss_fn, ema_decay=0.9, steps_per_dispatch=2
    )
    history = trainer.fit(batches, val_data=val, epochs=2)

    # The same updates by hand, with flax's EMA after each.
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, sgd(), wrt=nnx.Param)
    ema = nnx.EMA(model, 0.9, only=nnx.Param)

    @nnx.jit
    def step(model, optimizer, ema, batch):
        grads = nnx.grad(lambda m: loss_fn(m, batch)[0])(model)
        optimizer.update(model, grads)
        ema.update(model)

    for _ in range(2):
        for batch in batches:
            step(model, optimizer, ema, batch)
    for a, b in zip(arrays(trainer.optimizer.ema.params), arrays(ema.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(
        arrays(nnx.state(trainer.model, nnx.Param)), arrays(nnx.state(model, nnx.Param))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # Evaluations report both: the averaged weights' metrics are those of a model holding them.
    averaged = MLP(nnx.Rngs(0))
    nnx.update(averaged, trainer.optimizer.ema.params)
    plain = nl.Trainer(averaged, sgd(), loss_fn=loss_fn).evaluate(val)
    assert history["val_ema_loss"][-1] == pytest.approx(plain["loss"], rel=1e-5)
    assert history["val_ema_accuracy"][-1] == pytest.approx(plain["accuracy"], abs=1e-6)
    assert history["val_loss"][-1] != pytest.approx(history["val_ema_loss"][-1], rel=1e-4)
    evaluated = trainer.evaluate(val)
    assert evaluated["ema_loss"] == pytest.approx(history["val_ema_loss"][-1], rel=1e-6)


@pytest.mark.slow
def test_the_average_is_resumed_bitwise_and_loads_with_load_model(tmp_path):
    batches = make_batches(n_batches=6)

    def trainer(directory):
        return nl.Trainer(
            MLP(nnx.Rngs(0)),
            sgd(),
            loss_fn=loss_fn,
            ema_decay=0.8,
            callbacks=[nl.CheckpointCallback(directory, every_steps=4)],
        )

    whole = trainer(tmp_path / "whole")
    whole.fit(batches, epochs=3)
    first = trainer(tmp_path / "parts")
    first.fit(batches, epochs=1)  # step 6, saved at 4 and at the end
    second = trainer(tmp_path / "parts")
    second.fit(batches, epochs=3)  # resumes from step 6
    for a, b in zip(arrays(second.optimizer.ema.params), arrays(whole.optimizer.ema.params)):
        np.testing.assert_array_equal(a, b)

    loaded = nl.load_model(tmp_path / "whole", lambda: MLP(nnx.Rngs(1)), weights="ema")
    for a, b in zip(arrays(nnx.state(loaded, nnx.Param)), arrays(whole.optimizer.ema.params)):
        np.testing.assert_array_equal(a, b)

    # Fine-tuning from the average: a new head keeps its initial values, the trunk is loaded.
    class NewHead(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 5, rngs=rngs)

    built = NewHead(nnx.Rngs(3))
    head = arrays(nnx.state(built.l2, nnx.Param))
    tuned = nl.load_model(tmp_path / "whole", built, strict=False, weights="ema")
    for a, b in zip(
        arrays(nnx.state(tuned.l1, nnx.Param)), arrays(whole.optimizer.ema.params["l1"])
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(arrays(nnx.state(tuned.l2, nnx.Param)), head):
        np.testing.assert_array_equal(a, b)
    trained = nl.load_model(tmp_path / "whole", lambda: MLP(nnx.Rngs(1)))
    for a, b in zip(
        arrays(nnx.state(trained, nnx.Param)), arrays(nnx.state(whole.model, nnx.Param))
    ):
        np.testing.assert_array_equal(a, b)


def test_bad_uses_say_what_to_do(tmp_path):
    for bad in (0, 1, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="ema_decay must be a number between 0 and 1"):
            nl.Trainer(MLP(nnx.Rngs(0)), sgd(), loss_fn=loss_fn, ema_decay=bad)
    plain = nl.Trainer(
        MLP(nnx.Rngs(0)),
        sgd(),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(tmp_path / "ckpt")],
    )
    plain.fit(make_batches(2), epochs=1)
    with pytest.raises(nl.CheckpointError, match="trained without Trainer\\(ema_decay"):
        nl.load_model(tmp_path / "ckpt", lambda: MLP(nnx.Rngs(0)), weights="ema")
    with pytest.raises(ValueError, match='weights must be "model" or "ema"'):
        nl.load_model(tmp_path / "ckpt", lambda: MLP(nnx.Rngs(0)), weights="average")
