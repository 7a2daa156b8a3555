"""Checkpoints in a `gs://` bucket, against a real GCS JSON API server on 127.0.0.1.

The server (fake-gcs-server) is started by the fixture and stopped by its PID. Training runs in
subprocesses that are killed with SIGKILL and rerun, as in test_resume.py; only the storage
differs.
"""

import os

import jax
import numpy as np
import pytest
from conftest import loss_fn, make_batches, make_model, tx
from etils import epath
from flax import nnx
from kill_and_rerun import final_state, run_and_kill, run_to_end

import nnxloop as nl
from nnxloop import cli
from nnxloop.checkpointing import list_checkpoints

BUCKET = "nnxloop-test"


@pytest.fixture(scope="module")
def bucket(gcs):
    """`(gs://BUCKET, env for subprocesses, where the server keeps the bucket's objects)`."""
    server, env = gcs
    server.create_bucket(BUCKET)
    return f"gs://{BUCKET}", env, os.path.join(server.root, BUCKET)


def committed_steps(url):
    return sorted(s.step for s in list_checkpoints(url) if s.status == "complete")


def plant_half_written_step(url, step):
    """What a save killed in a bucket leaves: a step's files without orbax's commit marker
    (on object stores orbax writes the step in place and commits with a marker file)."""
    directory = epath.Path(f"{url}/{step}")
    (directory / "model").mkdir(parents=True, exist_ok=True)
    (directory / "model" / "_METADATA").write_text('{"tree_metadata": {}')  # cut short
    (directory / "_CHECKPOINT_METADATA").write_text("{")


@pytest.mark.slow
def test_killed_runs_in_a_bucket_resume_bitwise(bucket, reference, tmp_path, capsys):
    url, env, on_disk = bucket
    root = f"{url}/killed"
    # Killed mid-run, right after a save step of the async mode (every 6 steps here, fewer
    # round trips to the server): that save is still being written in the background.
    run_and_kill(tmp_path, "async", 18, delay=0.0, root=root, env=env, every=6)
    latest = committed_steps(f"{root}/ckpt")
    assert latest and len(latest) <= 2, f"retention keeps 2 in the bucket: {latest}"
    plant_half_written_step(f"{root}/ckpt", 999)
    started = run_to_end(tmp_path, "async", root=root, env=env, every=6)
    assert 0 < started < 40 and started == latest[-1], (started, latest)
    got = final_state(tmp_path)
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # The checkpoints are in the bucket, retention deleted old steps there, and nothing was
    # written to a local folder named after the URL.
    assert committed_steps(f"{root}/ckpt")[-1] == 40
    assert len(os.listdir(on_disk)) == 1  # the run's folder, as the server stores objects
    for where in (tmp_path, os.getcwd()):
        assert not os.path.exists(os.path.join(where, "gs:")), where

    # Loading and inspecting work on the bucket.
    best = nl.load_model(f"{root}/best", make_model(), step="best")
    assert isinstance(best, type(make_model()))
    assert cli.main(["inspect", f"{root}/ckpt", "--verify"]) == 0  # 999 never committed
    assert "incomplete (999)" in capsys.readouterr().out
    assert cli.main(["inspect", f"{root}/best"]) == 0
    assert cli.main(["inspect", f"{root}/ckpt", "--step", "40"]) == 0


@pytest.mark.slow
def test_in_process_save_restore_and_load_in_a_bucket(bucket, capsys):
    url, _, _ = bucket
    directory = f"{url}/in-process"

    def run():
        trainer = nl.Trainer(
            make_model(),
            tx(),
            loss_fn=loss_fn,
            callbacks=[nl.CheckpointCallback(directory, every_steps=2, max_to_keep=2)],
            progress=False,
        )
        trainer.fit(make_batches(4), max_steps=6)
        return trainer

    run()
    assert committed_steps(directory) == [4, 6]
    expected = nl.load_model(directory, make_model())
    again = run()  # resumes from the bucket: nothing left to train
    assert again.step == 6
    got, want = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (again.model, expected))
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert "Resumed from step 6" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["s3://bucket/run", "az://container/run", "hf://org/run"])
def test_a_url_orbax_cannot_write_is_refused_up_front(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for make in (
        lambda: nl.CheckpointCallback(url),
        lambda: nl.BestModelCallback(url),
        lambda: nl.load_model(url, make_model()),
    ):
        with pytest.raises(nl.CheckpointError, match=r"gs:// buckets only.*Mount the bucket"):
            make()
    assert cli.main(["inspect", url]) == 2
    assert os.listdir(tmp_path) == []  # no local folder named after the URL


def test_metrics_logger_refuses_a_bucket_and_says_what_to_do():
    with pytest.raises(ValueError, match=r"cannot write to gs://b/logs.*local directory"):
        nl.MetricsLogger("gs://b/logs")
