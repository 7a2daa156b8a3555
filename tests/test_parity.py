"""The trainer computes what a hand-written Flax NNX loop computes, at any steps_per_dispatch."""

import jax
import numpy as np
import optax
import pytest
from conftest import leaves_of, loss_fn, make_batches, make_model, state_leaves
from conftest import sgd as tx
from flax import nnx

import nnxloop as nl
from nnxloop._data import batches as batch_lib


@pytest.mark.slow
def test_matches_hand_written_nnx_loop_after_50_steps():
    data = make_batches(n_batches=25)
    model = make_model()
    nnx.reseed(model, dropout=0)
    trainer = nl.Trainer(model, tx(), loss_fn=loss_fn, seed=None)
    trainer.fit(data, max_steps=50)

    ref = make_model()
    nnx.reseed(ref, dropout=0)
    optimizer = nnx.Optimizer(ref, tx(), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss(model):
            return loss_fn(model, batch)[0]

        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)

    ref.train()
    for i in range(50):
        step(ref, optimizer, data[i % len(data)])

    for got, want in zip(leaves_of(trainer.model), leaves_of(ref)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(trainer.model.bn.mean[...]), np.asarray(ref.bn.mean[...]), atol=1e-5
    )


class Record(nl.Callback):
    def __init__(self):
        self.losses, self.evals = {}, []

    def on_step_end(self, trainer, step, logs):
        self.losses[step] = float(logs["loss"])

    def on_eval_end(self, trainer, step, metrics):
        self.evals.append((step, metrics["val_loss"]))


def run(k, callbacks=()):
    rec = Record()
    trainer = nl.Trainer(
        make_model(),
        optax.sgd(optax.cosine_decay_schedule(0.05, 40), momentum=0.9),
        loss_fn=loss_fn,
        steps_per_dispatch=k,
        callbacks=[rec, *callbacks],
    )
    trainer.fit(
        make_batches(n_batches=12), val_data=make_batches(2, seed=3), epochs=3, eval_every_steps=16
    )
    return trainer, rec


@pytest.mark.slow
def test_steps_per_dispatch_8_matches_1():
    t1, r1 = run(1)
    t8, r8 = run(8)
    assert t1.step == t8.step == 36
    assert ("staged", 8) in t8._engine._train_fns  # the scanned step did run
    assert sorted(r1.losses) == sorted(r8.losses) == list(range(1, 37))
    np.testing.assert_allclose(
        [r8.losses[s] for s in range(1, 37)], [r1.losses[s] for s in range(1, 37)], atol=1e-5
    )
    assert [s for s, _ in r8.evals] == [s for s, _ in r1.evals] == [16, 32]
    np.testing.assert_allclose([v for _, v in r8.evals], [v for _, v in r1.evals], atol=1e-5)
    for a, b in zip(leaves_of(t1.model), leaves_of(t8.model)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_dispatch_ends_on_steps_callbacks_ask_for():
    class AskFor(nl.Callback):
        def __init__(self):
            self.current = []

        def next_step(self, trainer, step):
            return 21 if step < 21 else None

        def on_step_end(self, trainer, step, logs):
            if trainer.state_is_current:
                self.current.append(step)

    ask = AskFor()
    run(8, callbacks=[ask])
    # the dispatch covering step 21 is cut there (run step by step); others are full scans
    assert {8, 16, 21, 24, 32} <= set(ask.current)
    assert not {1, 5, 25, 31} & set(ask.current)


def test_state_is_sharded_over_the_four_devices():
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    assert trainer.mesh.shape == {"data": 4}
    batch = jax.device_put(make_batches(1)[0], batch_lib.batch_sharding(trainer.mesh))
    assert len(batch["x"].sharding.device_set) == 4
    trainer.fit(make_batches(), max_steps=3)
    assert all(len(x.sharding.device_set) == 4 for _, x in state_leaves(trainer))
    assert jax.device_count() == 4
