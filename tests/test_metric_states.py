"""Metrics that are not batch means: `eval_step` and the training metrics may return mergeable
metric states (`clu.metrics.Metric`), merged on the device and computed once on the host."""

import flax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clu import metrics
from conftest import make_batches
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score

import nnxloop as nl

CLASSES = 10


@flax.struct.dataclass
class MacroF1(metrics.Metric):
    """Per-class true positives, false positives and false negatives; macro F1 over them."""

    tp: jnp.ndarray
    fp: jnp.ndarray
    fn: jnp.ndarray

    @classmethod
    def from_model_output(cls, *, logits, labels, **_):
        predicted = nnx.one_hot(logits.argmax(-1), CLASSES, dtype=jnp.int32)
        actual = nnx.one_hot(labels, CLASSES, dtype=jnp.int32)
        return cls(
            tp=(predicted * actual).sum(0),
            fp=(predicted * (1 - actual)).sum(0),
            fn=((1 - predicted) * actual).sum(0),
        )

    def merge(self, other):
        return type(self)(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def compute(self):
        # On the host, in float64, as scikit-learn computes it; a class never predicted nor
        # present scores 0 there (its zero_division default).
        tp, fp, fn = (np.asarray(a, np.float64) for a in (self.tp, self.fp, self.fn))
        denominator = 2 * tp + fp + fn
        per_class = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        return per_class.mean()


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def digits_batches(size):
    digits = load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int32)
    train = [{"x": x[i : i + 64], "y": y[i : i + 64]} for i in range(0, 1280, 64)]
    # Validation batches of an odd size, the last one shorter: a mean of per-batch F1 scores
    # would be off.
    end = 1280 + (len(x) - 1280) // 4 * 4  # every batch divides over 4 devices
    val = [
        {"x": x[i : min(i + size, end)], "y": y[i : min(i + size, end)]}
        for i in range(1280, end, size)
    ]
    return train, val


class F1Trainer(nl.Trainer):
    def loss_fn(self, model, batch):
        logits = model(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def eval_step(self, model, batch):
        logits = model(batch["x"])
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(),
            "f1": MacroF1.from_model_output(logits=logits, labels=batch["y"]),
            "accuracy": metrics.Accuracy.from_model_output(logits=logits, labels=batch["y"]),
        }


def test_macro_f1_over_the_validation_set_equals_scikit_learn_exactly():
    train, val = digits_batches(size=100)
    trainer = F1Trainer(Net(nnx.Rngs(0)), optax.adam(1e-2), progress=False)
    history = trainer.fit(train, val_data=val, epochs=2)

    labels = np.concatenate([b["y"] for b in val])
    predicted = trainer.predict([b["x"] for b in val]).argmax(-1)
    want = f1_score(labels, predicted, average="macro")
    assert history["val_f1"][-1] == want
    assert trainer.evaluate(val)["f1"] == want
    assert history["val_accuracy"][-1] == pytest.approx((predicted == labels).mean(), abs=1e-7)
    # What a mean of per-batch scores gives, for contrast: not the set's F1.
    per_batch = [
        f1_score(b["y"], p, average="macro")
        for b, p in zip(val, np.split(predicted, np.cumsum([len(b["y"]) for b in val])[:-1]))
    ]
    assert abs(np.mean(per_batch) - want) > 1e-3


def accuracy_loss(model, batch):
    logits = model(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {
        "accuracy": metrics.Accuracy.from_model_output(logits=logits, labels=batch["y"]),
        "batch_accuracy": (logits.argmax(-1) == batch["y"]).mean(),
    }


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.l1(x)


@pytest.mark.parametrize("steps_per_dispatch", [1, 4])
def test_a_training_metric_state_averages_over_examples_not_batches(steps_per_dispatch):
    """Batches of 16 and a last one of 4: an epoch's accuracy from `Accuracy` states weighs
    each example once; the scalar per-batch mean weighs the short batch as much as a full one.
    Each step's logs show that step's value."""
    batches = make_batches(n_batches=4, batch=16) + make_batches(n_batches=1, batch=4, seed=1)
    steps = []

    class Record(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            steps.append((float(logs["accuracy"]), float(logs["batch_accuracy"])))

    trainer = nl.Trainer(
        Tiny(nnx.Rngs(0)),
        optax.sgd(0.1),
        loss_fn=accuracy_loss,
        callbacks=[Record()],
        steps_per_dispatch=steps_per_dispatch,
        progress=False,
    )
    history = trainer.fit(batches, epochs=1)
    sizes = [16, 16, 16, 16, 4]
    per_step = np.array([a for a, _ in steps])
    np.testing.assert_allclose(per_step, [b for _, b in steps], rtol=1e-6)
    by_example = (per_step * sizes).sum() / sum(sizes)
    assert history["accuracy"][0] == pytest.approx(by_example, abs=1e-9)
    assert history["batch_accuracy"][0] == pytest.approx(per_step.mean(), abs=1e-6)


def test_accumulated_updates_merge_their_micro_batch_states():
    batches = make_batches(n_batches=8, batch=16)
    trainer = nl.Trainer(
        Tiny(nnx.Rngs(0)),
        optax.sgd(0.1),
        loss_fn=accuracy_loss,
        gradient_accumulation_steps=2,
        progress=False,
    )
    history = trainer.fit(batches, epochs=1)
    # Equal micro-batch sizes: the merged state's accuracy is the mean of the batch means.
    assert history["accuracy"][0] == pytest.approx(history["batch_accuracy"][0], abs=1e-6)


def test_metric_states_that_cannot_be_used_say_why():
    def last_value_loss(model, batch):
        loss = accuracy_loss(model, batch)[0]
        return loss, {"last": metrics.LastValue.from_model_output(value=loss)}

    trainer = nl.Trainer(Tiny(nnx.Rngs(0)), optax.sgd(0.1), loss_fn=last_value_loss)
    with pytest.raises(ValueError, match="'last' is a LastValue, whose merge is not the sum"):
        trainer.fit(make_batches(2), epochs=1)
    assert trainer.step == 0

    @flax.struct.dataclass
    class PerClass(metrics.Average):
        def compute(self):
            return self.total / self.count * np.ones(3)

    def per_class_eval(model, batch):
        return {"per_class": PerClass.from_model_output(model(batch["x"])[:, 0])}

    class Evaluating(nl.Trainer):
        def eval_step(self, model, batch):
            return per_class_eval(model, batch)

    trainer = Evaluating(Tiny(nnx.Rngs(0)), optax.sgd(0.1), loss_fn=accuracy_loss)
    with pytest.raises(ValueError, match=r"'per_class' \(PerClass\) computes to an array"):
        trainer.evaluate(make_batches(2))


def test_an_evaluation_state_starts_from_its_own_empty_state():
    """A maximum over the validation set: its empty state is -inf, not 0, so a set of
    negative values still reports its own maximum."""

    @flax.struct.dataclass
    class Maximum(metrics.Metric):
        value: jnp.ndarray

        @classmethod
        def empty(cls):
            return cls(value=jnp.array(-jnp.inf, jnp.float32))

        @classmethod
        def from_model_output(cls, values, **_):
            return cls(value=values.max().astype(jnp.float32))

        def merge(self, other):
            return type(self)(jnp.maximum(self.value, other.value))

        def compute(self):
            return self.value

    class Evaluating(nl.Trainer):
        def eval_step(self, model, batch):
            return {"max_logit": Maximum.from_model_output(-jnp.abs(model(batch["x"])) - 1.0)}

    batches = make_batches(3)
    trainer = Evaluating(Tiny(nnx.Rngs(0)), optax.sgd(0.1), loss_fn=accuracy_loss)
    got = trainer.evaluate(batches)["max_logit"]
    model = trainer.model
    want = max(float((-np.abs(np.asarray(model(b["x"]))) - 1.0).max()) for b in batches)
    assert got == pytest.approx(want, abs=1e-6) and got < -1.0


def test_a_training_state_computed_with_numpy_is_refused_saying_why():
    def f1_loss(model, batch):
        logits = model(batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {"f1": MacroF1.from_model_output(logits=logits, labels=batch["y"])}

    trainer = nl.Trainer(Tiny(nnx.Rngs(0)), optax.sgd(0.1), loss_fn=f1_loss)
    with pytest.raises(
        TypeError, match="'f1' \\(MacroF1\\) cannot be computed inside the compiled"
    ):
        trainer.fit(make_batches(2), epochs=1)
