"""load_model(strict=False): loading what matches into a changed model, for fine-tuning."""

import logging

import jax
import numpy as np
import pytest
from conftest import TinyNet, loss_fn, make_batches, make_model, tx
from flax import nnx

import nnxloop as nl


class WithExtraLayer(nnx.Module):
    """TinyNet's layers under the same names, and one more."""

    def __init__(self, rngs):
        base = TinyNet(rngs)
        self.l1, self.bn, self.drop, self.l2 = base.l1, base.bn, base.drop, base.l2
        self.extra = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        return self.extra(self.l2(self.drop(nnx.relu(self.bn(self.l1(x))))))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pretrained") / "ckpt"
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(directory)],
        progress=False,
    )
    trainer.fit(make_batches(4), epochs=1)
    return directory, nl.load_model(directory, make_model())


def arrays(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def same(a, b):
    return len(arrays(a)) == len(arrays(b)) and all(
        np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b))
    )


def test_a_new_head_keeps_its_initial_values_and_the_trunk_is_loaded(pretrained, caplog):
    directory, saved = pretrained
    built = TinyNet(nnx.Rngs(7), dout=5)  # a new head: 5 classes instead of 3
    initial_head = arrays(built.l2)
    with caplog.at_level(logging.WARNING, logger="nnxloop"):
        model = nl.load_model(directory, built, strict=False)
    assert model is built
    assert same(model.l1, saved.l1) and same(model.bn, saved.bn)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(model.l2), initial_head))
    text = caplog.text
    assert "except 2 arrays" in text
    assert "['l2']['kernel'].value: shape (16, 3) in the checkpoint, (16, 5) in the model" in text
    assert "['l2']['bias'].value: shape (3,) in the checkpoint, (5,) in the model" in text
    # The loaded model trains and evaluates like any other.
    trainer = nl.Trainer(model, tx(), loss_fn=loss_fn, progress=False)
    trainer.fit(make_batches(4), max_steps=2)
    assert trainer.step == 2


def test_strict_loading_names_the_leaf_and_points_to_strict_false(pretrained):
    directory, _ = pretrained
    with pytest.raises(nl.CheckpointError, match=r"\['l2'\]\['(kernel|bias)'\].*pass strict=False"):
        nl.load_model(directory, lambda: TinyNet(nnx.Rngs(0), dout=5))


def test_extra_and_missing_arrays_are_reported_either_way(pretrained, caplog):
    directory, saved = pretrained
    with caplog.at_level(logging.WARNING, logger="nnxloop"):
        model = nl.load_model(directory, lambda: WithExtraLayer(nnx.Rngs(0)), strict=False)
    assert same(model.l2, saved.l2)
    assert "['extra']['kernel'].value: not in the checkpoint; kept as built" in caplog.text
    caplog.clear()

    class TrunkOnly(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 16, rngs=rngs)

    with caplog.at_level(logging.WARNING, logger="nnxloop"):
        trunk = nl.load_model(directory, lambda: TrunkOnly(nnx.Rngs(0)), strict=False)
    assert same(trunk.l1, saved.l1)
    assert "l2/kernel/value: in the checkpoint only; not loaded" in caplog.text


def test_a_model_with_nothing_in_common_is_refused(pretrained):
    directory, _ = pretrained
    other = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(nl.CheckpointError, match="No array of the checkpoint .* matches"):
        nl.load_model(directory, other, strict=False)
