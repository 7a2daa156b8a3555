import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaves_of, loss_fn, make_batches, make_model, tx

import nnxloop as nl


@pytest.fixture(scope="module")
def trainer():
    return nl.Trainer(make_model(), tx(), loss_fn=loss_fn)


def test_leaves_disagreeing_on_batch_size_are_named(trainer):
    bad = {"x": np.zeros((16, 6), np.float32), "y": np.zeros((12,), np.int32)}
    with pytest.raises(ValueError, match=r"\['x'\]: 16, \['y'\]: 12"):
        trainer.fit([bad], max_steps=1)


def test_batch_not_divisible_by_devices(trainer):
    bad = make_batches(1, batch=6)
    with pytest.raises(ValueError, match="batch of size 6 cannot be split over the 4 devices"):
        trainer.fit(bad, max_steps=1)
    with pytest.raises(ValueError, match="batch of size 6"):
        trainer.evaluate(bad)


def test_scalar_leaf(trainer):
    bad = {"x": np.zeros((16, 6), np.float32), "y": np.int32(0)}
    with pytest.raises(ValueError, match="disagree on the batch size"):
        trainer.fit([bad], max_steps=1)


def test_empty_data(trainer):
    with pytest.raises(ValueError, match="yielded no batches"):
        trainer.fit([], epochs=1)
    with pytest.raises(ValueError, match="yielded no batches"):
        trainer.evaluate([])


def test_one_shot_iterator_with_epochs(trainer):
    with pytest.raises(TypeError, match="one-shot iterator"):
        trainer.fit(iter(make_batches(2)), epochs=1)


def test_one_shot_iterator_with_max_steps_is_fine():
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn)
    trainer.fit(iter(make_batches(20)), max_steps=5)
    assert trainer.step == 5


def test_eval_every_steps_needs_val_data(trainer):
    with pytest.raises(ValueError, match="without val_data"):
        trainer.fit(make_batches(2), max_steps=2, eval_every_steps=1)


def test_bad_metric_is_named():
    def vector_metric(model, batch):
        logits = model(batch["x"])
        return logits.mean(), {"per_example": logits.mean(-1)}

    trainer = nl.Trainer(make_model(), tx(), loss_fn=vector_metric)
    with pytest.raises(ValueError, match="'per_example' with shape"):
        trainer.fit(make_batches(1), max_steps=1)


def test_device_batches_train_like_host_batches_with_steps_per_dispatch():
    host = make_batches()
    device = [jax.tree.map(jnp.asarray, b) for b in host]
    results = []
    for batches in (host, device):
        trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, steps_per_dispatch=4)
        # Device batches are stacked on the device. On an accelerator this guard fails on any
        # implicit copy back to the host (on CPU, host views are not transfers: it passes).
        with jax.transfer_guard_device_to_host("disallow"):
            history = trainer.fit(batches, epochs=1)
        results.append((history["loss"], leaves_of(trainer.model)))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(a, b)
