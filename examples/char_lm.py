"""A small transformer language model over bytes of text that ships with Python itself (the
standard library's own source), with async checkpointing and TensorBoard logs.

    python examples/char_lm.py [--steps 600] [--layers 2] [--width 128] [--workdir runs/char_lm]

Then `tensorboard --logdir runs/char_lm/logs`. Rerunning resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import textwrap

import grain
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nnxloop as nl

SOURCES = ("textwrap.py", "string.py", "fnmatch.py", "glob.py", "shlex.py", "calendar.py")


def corpus() -> np.ndarray:
    """Bytes of a few standard-library modules, found next to `textwrap` on this machine."""
    folder = pathlib.Path(textwrap.__file__).parent
    text = b"\n".join((folder / name).read_bytes() for name in SOURCES)
    return np.frombuffer(text, dtype=np.uint8)


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            heads, width, decode=False, dropout_rate=0.1, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attention(self.norm1(x), mask=mask)
        return x + self.dropout(self.down(nnx.gelu(self.up(self.norm2(x)))))


class ByteLM(nnx.Module):
    def __init__(self, *, seq_len: int, width: int, layers: int, heads: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(256, width, rngs=rngs)
        self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (seq_len, width)))
        self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.norm(x))  # output weights tied to the embedding


def loss_fn(model, batch):
    logits = model(batch["tokens"][:, :-1])
    targets = batch["tokens"][:, 1:]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, {"bits_per_byte": loss / jnp.log(2.0)}


def datasets(seq_len: int, batch_size: int):
    data = corpus()
    windows = data[: len(data) // (seq_len + 1) * (seq_len + 1)].reshape(-1, seq_len + 1)
    split = int(0.95 * len(windows))
    records = [{"tokens": w.astype(np.int32)} for w in windows]
    train = grain.MapDataset.source(records[:split]).shuffle(seed=0)
    val = grain.MapDataset.source(records[split:])
    return (
        train.batch(batch_size, drop_remainder=True),
        val.batch(batch_size, drop_remainder=True),
    )


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--workdir", default="runs/char_lm")
    args = parser.parse_args(argv)

    train, val = datasets(args.seq_len, args.batch_size)
    model = ByteLM(
        seq_len=args.seq_len,
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        rngs=nnx.Rngs(0),
    )
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, args.steps // 10, args.steps)
    trainer = nl.Trainer(
        model,
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)),
        loss_fn=loss_fn,
        callbacks=[
            nl.CheckpointCallback(
                os.path.join(args.workdir, "ckpt"), every_steps=max(1, args.steps // 4)
            ),
            nl.AsyncSaveCallback(),
            nl.MetricsLogger(
                os.path.join(args.workdir, "logs"),
                every_steps=max(1, args.steps // 20),
                learning_rate=schedule,
            ),
            nl.TerminateOnNaN(),
        ],
    )
    trainer.fit(train, val_data=val, max_steps=args.steps, eval_every_steps=max(1, args.steps // 4))
    metrics = trainer.evaluate(val)
    print(f"step {trainer.step}: validation {metrics['bits_per_byte']:.3f} bits per byte")
    return metrics


if __name__ == "__main__":
    main()
