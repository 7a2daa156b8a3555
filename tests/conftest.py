"""Shared fixtures. Four fake CPU devices, so every test also exercises batch sharding."""

import os
import shutil
import tempfile

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
# Most test programs run a few steps of a tiny model, so LLVM's optimisation of the generated
# code costs far more than it saves: the tests compile with it off (about a third less time
# for the suite). XLA's graph-level passes (fusion, buffer assignment, donation) still run; the
# benchmarks (benchmarks/) compile as users do.
TEST_FLAGS = f"{COLLECTIVE_FLAGS} --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_FLAGS}".strip()

# Most tests build the same small models, and every Trainer compiles its steps afresh: XLA's
# compile time was about half of the suite. One persistent compilation cache for the session
# (this process and the scripts it starts) compiles each distinct program once. A cache entry
# holds the executable XLA built, so results are those of a fresh compile, bit for bit. The
# cache is a temporary directory, removed when the session ends (a JAX_COMPILATION_CACHE_DIR
# of your own is used as it is, and kept).
_OWN_JAX_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_JAX_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nnxloop-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_JAX_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
    no XLA flags but the tests' own above."""
    here = os.path.dirname(os.path.abspath(__file__))
    # No W&B settings from this process: a W&B run in it (a docs page) leaves the address of
    # its service process in WANDB_SERVICE, and a script that inherited it would log there.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return dict(inherited, PYTHONPATH=here, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_FLAGS, **extra)


def state_leaves(trainer) -> list[tuple[str, jax.Array]]:
    """`(path, array)` for every array of the trainer's model and optimizer state, in order,
    as the user reads them (`trainer.model`, `trainer.optimizer`)."""
    state = nnx.state((trainer.model, trainer.optimizer))
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]


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


class PlainMLP(nnx.Module):
    """Linear -> relu -> Linear: no batch statistics, no dropout, so a batch's loss is the
    mean of its examples' (batches can be split or joined without changing an update)."""

    def __init__(self, rngs: nnx.Rngs, din: int = 6, hidden: int = 32, dout: int = 3):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


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


def injected_sgd():
    """`sgd()` with its learning rate in the optimizer state (`set_learning_rate` works)."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9)


def leaves_of(model):
    return jax.tree.leaves(jax.device_get(nnx.state(model, nnx.Param)))


@pytest.fixture(autouse=True)
def _visible_run_lines():
    # A docs page shows how to silence nnxloop's stderr lines; the next test sees them again.
    import logging

    yield
    logging.getLogger("nnxloop.run").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The final state of `resume_run.py` run once without interruption (local checkpoints):
    what every killed-and-rerun run must end with, bit for bit."""
    from kill_and_rerun import final_state, run_to_end

    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(workdir, "sync")
    return final_state(workdir)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """One GCS JSON API server on 127.0.0.1 for the whole session (gcsfs and tensorstore keep
    the endpoint they first see), with this process pointed at it: `(server, env)`. Stopped by
    its PID at the end."""
    from gcs_server import Server, environment

    server = Server(str(tmp_path_factory.mktemp("gcs") / "objects"))
    server.__enter__()
    env = environment(server.url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server, env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
