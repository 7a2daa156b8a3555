"""A Trainer subclass with its own train_step: an exponential moving average (EMA) of the
weights, kept in the model (so it is checkpointed and resumed) and used for evaluation.

    python examples/custom_train_step.py [--epochs 10] [--decay 0.99]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import optax
from flax import nnx

import nnxloop as nl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import DigitsMLP, digits_datasets  # noqa: E402


class Ema(nnx.Variable):
    """The moving average of one parameter: a variable type of its own, so the optimizer
    (which updates `nnx.Param`) leaves it alone."""


class WithEma(nnx.Module):
    def __init__(self, net: nnx.Module):
        self.net = net
        self.ema = nnx.List([Ema(p.copy()) for p in jax.tree.leaves(nnx.state(net, nnx.Param))])

    def __call__(self, x):
        return self.net(x)


def cross_entropy(model, batch):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


class EmaTrainer(nl.Trainer):
    """Trains `model.net` as usual, then moves the averages towards the new weights."""

    def __init__(self, model: WithEma, tx, *, decay: float = 0.99, **kwargs):
        self.decay = decay
        super().__init__(model, tx, **kwargs)

    def loss_fn(self, model, batch):
        return cross_entropy(model, batch)

    def train_step(self, model, optimizer, batch):
        metrics = super().train_step(model, optimizer, batch)  # the usual update
        params = jax.tree.leaves(nnx.state(model.net, nnx.Param))
        for average, param in zip(model.ema, params):
            average[...] = self.decay * average[...] + (1 - self.decay) * param
        return metrics

    def eval_step(self, model, batch):
        # Evaluate with the averaged weights (changes made here are not kept).
        params = nnx.state(model.net, nnx.Param)
        averaged = jax.tree.unflatten(jax.tree.structure(params), [e[...] for e in model.ema])
        nnx.update(model.net, averaged)
        return super().eval_step(model, batch)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--workdir", default="runs/ema")
    args = parser.parse_args(argv)

    train, val = digits_datasets(batch_size=64)
    trainer = EmaTrainer(
        WithEma(DigitsMLP(rngs=nnx.Rngs(0))),
        optax.adam(3e-3),
        decay=args.decay,
        callbacks=[nl.CheckpointCallback(os.path.join(args.workdir, "ckpt"))],
    )
    history = trainer.fit(train, val_data=val, epochs=args.epochs)
    print(f"EMA weights: validation accuracy {history['val_accuracy'][-1]:.4f}")
    return trainer.evaluate(val)


if __name__ == "__main__":
    main()
