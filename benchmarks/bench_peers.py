"""Training throughput against the peers, side by side, as ratios to a hand-written jit loop.

    python benchmarks/bench_peers.py [--quick] [--repeats N] [--config 784-32-32-10]

Every contender trains the same MLP (relu between the layers) with Adam (lr 1e-3) on softmax
cross-entropy, fed the same NumPy batches, on the CPU:

- hand-written: `nnx.split` once + `jax.jit(donate_argnums=0)` (from bench_step.py), the 1.00x;
- nnxloop `Trainer.fit` with `steps_per_dispatch` 1 and 8 (from bench_step.py), the list of
  batches staged on the device (the default for a list this small), and K=8 unstaged (each
  batch passed from the host, as for data from an iterator);
- the Flax tutorial loop: `train_step(model, optimizer, batch)` under `@nnx.jit`;
- Keras 3 `model.fit` on the JAX backend, `steps_per_execution` 1, 8 and 32 (the issue asks
  for 1 and 8; 32 checks that 8 is Keras's best);
- PyTorch eager (a plain loop) and PyTorch Lightning `Trainer.fit`, on all cores.

Each is timed over whole `fit` calls (or loops) after a warm-up, and so includes what a user
pays per call. Prints steps/s (median of interleaved repeats, with min-max spread) and the ratio
to the hand-written loop, then nnxloop K=8's ratio to Keras at its best `steps_per_execution`
and to Lightning (the benchmarks issue's targets). Peers that are not installed
(`pip install -e ".[bench]"`) are skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
import time
import warnings

os.environ["KERAS_BACKEND"] = "jax"  # read when keras is first imported

import jax  # noqa: E402
import optax  # noqa: E402
from bench_step import MLP, hand_written, loss_fn, make_batches, trainer_loop  # noqa: E402
from common import compare, machine_line, versions_line  # noqa: E402
from flax import nnx  # noqa: E402

try:
    import keras
except ImportError:
    keras = None
try:
    import torch
except ImportError:
    torch = None
try:
    import lightning
except ImportError:
    lightning = None


def flax_tutorial(sizes, batches, steps):
    """The loop of the Flax NNX tutorials: stateful objects through `nnx.jit`, no donation."""
    model = MLP(sizes, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    def run(n):
        for i in range(n):
            loss = train_step(model, optimizer, batches[i % len(batches)])
        jax.block_until_ready((nnx.state(model), loss))

    run(3)  # compile
    start = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - start)


def keras_fit(sizes, batches, steps, k):
    model = keras.Sequential(
        [keras.Input((sizes[0],))]
        + [keras.layers.Dense(n, activation="relu") for n in sizes[1:-1]]
        + [keras.layers.Dense(sizes[-1])]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=k,
    )

    def data():
        for batch in itertools.cycle(batches):
            yield batch["x"], batch["y"]

    steps = max(k, steps - steps % k)
    model.fit(data(), steps_per_epoch=2 * k, shuffle=False, verbose=0)  # compile
    start = time.perf_counter()
    model.fit(data(), steps_per_epoch=steps, shuffle=False, verbose=0)
    return steps / (time.perf_counter() - start)


def torch_mlp(sizes):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1]))


def torch_batches(batches):
    return [(torch.from_numpy(b["x"]), torch.from_numpy(b["y"]).long()) for b in batches]


def torch_eager(sizes, batches, steps):
    model = torch_mlp(sizes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch_batches(batches)

    def run(n):
        for i in range(n):
            x, y = data[i % len(data)]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()

    run(3)  # first-call allocations
    start = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - start)


def lightning_fit(sizes, batches, steps):
    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch_mlp(sizes)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    # Whole batches, as the other contenders get them: no per-example collation.
    loader = torch.utils.data.DataLoader(torch_batches(batches), batch_size=None)
    module = Classifier()

    def fit(n):
        trainer = lightning.Trainer(
            max_steps=n,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, train_dataloaders=loader)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # advice about DataLoader workers, not our concern
        fit(3)
        start = time.perf_counter()
        fit(steps)
        return steps / (time.perf_counter() - start)


def contenders(sizes, batches, steps):
    """`{label: zero-argument runner}` of the installed contenders, and a skip line for each
    missing peer."""
    runs = {
        "hand-written jit": functools.partial(hand_written, sizes, batches, steps),
        "nnxloop K=1": functools.partial(trainer_loop, sizes, batches, steps, 1),
        "nnxloop K=8": functools.partial(trainer_loop, sizes, batches, steps, 8),
        "K=8 unstaged": functools.partial(trainer_loop, sizes, batches, steps, 8, stage_data=False),
        "flax @nnx.jit": functools.partial(flax_tutorial, sizes, batches, steps),
    }
    skipped = []
    if keras is not None:
        runs["keras fit spe=1"] = functools.partial(keras_fit, sizes, batches, steps, 1)
        runs["keras fit spe=8"] = functools.partial(keras_fit, sizes, batches, steps, 8)
        runs["keras fit spe=32"] = functools.partial(keras_fit, sizes, batches, steps, 32)
    else:
        skipped.append("keras")
    if torch is not None:
        runs["torch eager"] = functools.partial(torch_eager, sizes, batches, steps)
    else:
        skipped.append("torch")
    if torch is not None and lightning is not None:
        runs["lightning fit"] = functools.partial(lightning_fit, sizes, batches, steps)
    else:
        skipped.append("lightning")
    return runs, skipped


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--config",
        action="append",
        help="measure only the models whose name starts with this (repeatable), e.g. 784-32-32-10",
    )
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    # (name, layer sizes, batch size, steps, distinct batches): the big model gets few distinct
    # batches because trainer_loop warms up on 2 * K passes over them.
    if args.quick:
        configs = [("784-32-32-10 b32", (784, 32, 32, 10), 32, 64, 8)]
    else:
        configs = [
            ("784-32-32-10 b32", (784, 32, 32, 10), 32, 3000, 32),
            ("784-256-256-10 b128", (784, 256, 256, 10), 128, 600, 32),
            ("784-2048-2048-10 b512", (784, 2048, 2048, 10), 512, 32, 2),
        ]
    if args.config:
        names = [c[0] for c in configs]
        configs = [c for c in configs if any(c[0].startswith(p) for p in args.config)]
        if not configs:
            parser.error(f"--config {args.config} matches none of the models: {names}")
    print(versions_line("jax", "flax", "optax", "numpy", "keras", "torch", "lightning"))
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, {machine_line()}")
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
        print(f"torch threads {torch.get_num_threads()}, torch CUDA build: {torch.version.cuda}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # "GPU available: False"...
    results = {}
    for name, sizes, batch, steps, distinct in configs:
        batches = make_batches(sizes[0], batch, n=distinct)
        runs, skipped = contenders(sizes, batches, steps)
        ratios = compare(name, runs, repeats=repeats, steps=steps, base="hand-written jit")
        for label, ratio in ratios.items():
            results[(name, label)] = ratio
        for peer in skipped:
            print(f"  {peer:18s} skipped: not installed (pip install -e '.[bench]')")
        print_targets(ratios)
    return results


def print_targets(ratios: dict[str, float]) -> None:
    """nnxloop K=8 against Keras at its best `steps_per_execution` and against Lightning (the
    benchmarks issue asks for >= 1.2x and >= 8x on the tiny model), where both were run."""
    ours = ratios.get("nnxloop K=8")
    keras_runs = {k: v for k, v in ratios.items() if k.startswith("keras fit spe=")}
    if ours is None:
        return
    if keras_runs:
        best = max(keras_runs, key=keras_runs.get)
        setting = best.removeprefix("keras fit ")
        print(f"  nnxloop K=8 / Keras best ({setting}): {ours / keras_runs[best]:.2f}x")
    if "lightning fit" in ratios:
        print(f"  nnxloop K=8 / Lightning: {ours / ratios['lightning fit']:.1f}x")


if __name__ == "__main__":
    main()
