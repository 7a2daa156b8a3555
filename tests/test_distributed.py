import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import make_batches, state_leaves
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from parallel_models import ColumnRowMLP, loss_fn

import nnxloop as nl

HERE = os.path.dirname(os.path.abspath(__file__))


def mesh_2x2(axis_type=AxisType.Auto):
    return jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type, axis_type))


def build(mesh, **kwargs):
    with jax.set_mesh(mesh):
        return ColumnRowMLP(nnx.Rngs(0), **kwargs)


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def data_parallel_result():
    trainer = nl.Trainer(
        ColumnRowMLP(nnx.Rngs(0), partitioned=False), optax.adam(1e-2), loss_fn=loss_fn
    )
    trainer.fit(make_batches(), max_steps=6)
    return params(trainer.model)


def unpadded(spec):
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_model_parallel_matches_data_parallel(axis_type, data_parallel_result):
    mesh = mesh_2x2(axis_type)
    model = build(mesh, explicit=axis_type == AxisType.Explicit)
    trainer = nl.Trainer(model, optax.adam(1e-2), loss_fn=loss_fn, mesh=mesh)
    trainer.fit(make_batches(), max_steps=6)
    # P("model") and P("model", None) lay an array out alike: compared without trailing Nones
    specs = {path: unpadded(leaf.sharding.spec) for path, leaf in state_leaves(trainer)}
    assert specs["[0]['l1']['kernel'].value"] == P(None, "model")
    assert specs["[0]['l2']['kernel'].value"] == P("model")
    # Adam's moments follow their parameter's sharding
    moments = [p for p in specs if "['mu']['l1']['kernel']" in p or "['nu']['l2']['kernel']" in p]
    assert [specs[p] for p in sorted(moments)] == [P(None, "model"), P("model")]
    for got, want in zip(params(trainer.model), data_parallel_result):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_annotation_on_an_axis_the_mesh_lacks():
    model = build(mesh_2x2())
    with pytest.raises(
        ValueError, match=r"partitioned over mesh axes \['model'\].*axes \('data',\)"
    ):
        nl.Trainer(model, optax.adam(1e-2), loss_fn=loss_fn)


def test_checkpoint_reshards_onto_another_layout(tmp_path):
    trainer = nl.Trainer(
        ColumnRowMLP(nnx.Rngs(0), partitioned=False),
        optax.adam(1e-2),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(tmp_path)],
    )
    trainer.fit(make_batches(), max_steps=5)
    saved = [np.asarray(x) for _, x in state_leaves(trainer) if x.dtype == np.float32]

    mesh = mesh_2x2()
    resumed = nl.Trainer(
        build(mesh, partitioned=True, explicit=False),
        optax.adam(1e-2),
        loss_fn=loss_fn,
        mesh=mesh,
        callbacks=[nl.CheckpointCallback(tmp_path)],
    )
    resumed.fit(make_batches(), max_steps=5)  # restores, nothing left to train
    assert resumed.step == 5
    restored = [x for _, x in state_leaves(resumed) if x.dtype == np.float32]
    assert any(x.sharding.spec == P(None, "model") for x in restored)
    for got, want in zip(restored, saved):
        assert np.array_equal(np.asarray(got), want)


@pytest.mark.slow
def test_saved_on_8_devices_resumes_on_4_and_loads_on_1(tmp_path):
    env = dict(os.environ, PYTHONPATH=HERE, JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, os.path.join(HERE, "reshard_run.py"), str(tmp_path)],
        check=True,
        timeout=120,
        env=env,
        capture_output=True,
    )
    with np.load(tmp_path / "params.npz") as f:
        on_8 = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]

    mesh = mesh_2x2()
    trainer = nl.Trainer(
        build(mesh),
        optax.adam(1e-2),
        loss_fn=loss_fn,
        mesh=mesh,
        callbacks=[nl.CheckpointCallback(tmp_path / "ckpt")],
    )
    trainer.fit(make_batches(), max_steps=8)
    assert trainer.step == 8
    for got, want in zip(params(trainer.model), on_8):
        assert np.array_equal(got, want)

    loaded = nl.load_model(tmp_path / "ckpt", lambda: ColumnRowMLP(nnx.Rngs(1), partitioned=False))
    for got, want in zip(params(loaded), on_8):
        assert np.array_equal(got, want)
