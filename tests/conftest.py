"""Shared fixtures. Four fake CPU devices, so every test also exercises batch sharding."""

import os

# XLA's CPU collectives meet every device's thread at a rendezvous and abort the whole process
# (LOG(FATAL): "Termination timeout ... Exiting to ensure a consistent program state") when
# one thread is later than a timeout. On a loaded 2-core machine, with 4 fake devices sharing
# 2 cores, one can be that late: the suite then died with "Fatal Python error: Aborted". The
# tests check results, not latency, so they give the threads far longer. Subprocesses started
# by the tests get the same flags (`subprocess_env`).
COLLECTIVE_FLAGS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COLLECTIVE_FLAGS}".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402


class TinyNet(nnx.Module):
    """Linear -> BatchNorm -> relu -> Dropout -> Linear: every kind of state a model holds."""

    def __init__(self, rngs: nnx.Rngs, din: int = 6, hidden: int = 16, dout: int = 3):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a script a test starts: CPU only, this directory importable, and
    no XLA flags but the collective timeouts above."""
    here = os.path.dirname(os.path.abspath(__file__))
    return dict(
        os.environ, PYTHONPATH=here, JAX_PLATFORMS="cpu", XLA_FLAGS=COLLECTIVE_FLAGS, **extra
    )


def save_final_state(trainer, path) -> None:
    """Every array of the trainer's model and optimizer state, in order, to an `.npz` file
    (PRNG keys as their key data), for bitwise comparisons across processes."""
    state = nnx.state((trainer.model, trainer.optimizer))
    leaves = [
        np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for x in jax.tree.leaves(state)
    ]
    np.savez(path, *leaves)


def make_model(seed: int = 0) -> TinyNet:
    return TinyNet(nnx.Rngs(seed))


def loss_fn(model, batch):
    logits = model(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


def make_batches(n_batches: int = 12, batch: int = 16, seed: int = 0, din: int = 6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_batches * batch, din)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
    return [{"x": x[i : i + batch], "y": y[i : i + batch]} for i in range(0, len(x), batch)]


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture
def val_batches():
    return make_batches(n_batches=3, seed=1)


def tx():
    return optax.adam(1e-2)


def sgd():
    # For comparing runs that sum gradients in different orders: momentum SGD is continuous in
    # the gradients, whereas Adam turns float noise in a zero gradient (the bias before
    # BatchNorm) into a full +-lr step.
    return optax.sgd(0.05, momentum=0.9)


def leaves_of(model):
    return jax.tree.leaves(jax.device_get(nnx.state(model, nnx.Param)))


@pytest.fixture(autouse=True)
def _visible_run_lines():
    # A docs page shows how to silence nnxloop's stderr lines; the next test sees them again.
    import logging

    yield
    logging.getLogger("nnxloop.run").setLevel(logging.INFO)
