import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaves_of, loss_fn, make_batches, make_model, tx

import nnxloop as nl
from nnxloop._data import batches as batch_lib
from nnxloop._data import staging


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


class Reiterable:
    """A re-iterable that is not a list: never staged."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.slow
def test_staged_and_iterated_data_train_alike(monkeypatch):
    # 7 batches of 16 and a last one of 8: with K=4 the second dispatch of each epoch holds
    # the small batch, so it runs as single steps on either path.
    batches = make_batches(n_batches=8)
    batches[-1] = jax.tree.map(lambda x: x[:8], batches[-1])

    def run(data, stage_data=None, split_at=None, k=4):
        trainer = nl.Trainer(
            make_model(), tx(), loss_fn=loss_fn, steps_per_dispatch=k, stage_data=stage_data
        )
        if split_at:  # a second fit call resumes mid-epoch
            trainer.fit(data, max_steps=split_at)
        history = trainer.fit(data, epochs=2)
        return trainer, history.epochs[-1]["loss"], leaves_of(trainer.model)

    staged, *want = run(batches)
    assert {("staged", 4), ("host", False)} == set(staged._engine._train_fns)
    iterated, *got = run(Reiterable(batches))
    assert ("host", True) in iterated._engine._train_fns
    runs = [
        got,
        run(batches, stage_data=False)[1:],
        run(batches, split_at=5)[1:],
        run(tuple(batches), stage_data=True, split_at=10)[1:],
    ]
    monkeypatch.setattr(staging, "STAGE_AUTO_BYTES", 1000)  # over the automatic limit
    over_limit, *more = run(batches)
    assert not any(kind == "staged" for kind, _ in over_limit._engine._train_fns)
    for i, (loss, leaves) in enumerate([*runs, more]):
        if i != 3:  # (split mid-epoch 1: that average covers only the second call's steps)
            assert loss == want[0]
        for a, b in zip(leaves, want[1]):
            np.testing.assert_array_equal(a, b)
    # K=1: each batch is staged as it is
    _, *want = run(batches, k=1)
    _, *got = run(batches, k=1, stage_data=False)
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_list_shuffled_between_epochs_is_staged_anew():
    class Shuffle(nl.Callback):
        def __init__(self, data):
            self.data = data

        def on_epoch_begin(self, trainer, epoch):
            np.random.default_rng(epoch).shuffle(self.data)

    results = []
    for stage_data in (None, False):
        data = make_batches(n_batches=4)
        trainer = nl.Trainer(
            make_model(),
            tx(),
            loss_fn=loss_fn,
            steps_per_dispatch=2,
            stage_data=stage_data,
            callbacks=[Shuffle(data)],
        )
        trainer.fit(data, epochs=3)
        results.append(leaves_of(trainer.model))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_staged_steps_prepare_no_batch_on_the_host(monkeypatch):
    prepared = []
    prepare = batch_lib.prepare
    monkeypatch.setattr(
        batch_lib, "prepare", lambda b, *a, **kw: prepared.append(1) or prepare(b, *a, **kw)
    )
    batches = make_batches(n_batches=5)
    batches[-1] = jax.tree.map(lambda x: x[:8], batches[-1])  # not alike: passed from the host
    for k, data, want in ((1, batches, 2), (2, batches[:4], 0)):
        prepared.clear()
        nl.Trainer(make_model(), tx(), loss_fn=loss_fn, steps_per_dispatch=k).fit(data, epochs=2)
        assert len(prepared) == want  # K=1: the small batch, once an epoch


def test_stage_data_true_says_why_it_cannot_stage():
    trainer = nl.Trainer(make_model(), tx(), loss_fn=loss_fn, stage_data=True)
    with pytest.raises(ValueError, match="cannot be staged on the device: it is a Reiterable"):
        trainer.fit(Reiterable(make_batches(2)), max_steps=1)
    with pytest.raises(ValueError, match="not NumPy or JAX arrays"):
        trainer.fit([{"x": [[0.0] * 6] * 4, "y": [0] * 4}], max_steps=1)
    with pytest.raises(ValueError, match="stage_data must be None, True or False"):
        nl.Trainer(make_model(), tx(), loss_fn=loss_fn, stage_data="yes")
