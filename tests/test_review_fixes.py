"""Edge cases found in review: odd characters in paths, a lock naming this very process, a
profile after a resume, many hyper-parameters for MLflow, writers closing after an error."""

import json
import os
import shutil
import socket

import jax
import pytest
from conftest import loss_fn, make_batches, make_model, tx

import nnxloop as nl
from nnxloop import cli
from nnxloop.checkpointing import lock
from nnxloop.writers import MetricWriter, MultiWriter


def test_verify_reads_steps_in_a_directory_with_url_characters(tmp_path, capsys):
    directory = tmp_path / "run #3 50%?" / "ckpt"
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(directory, every_steps=2)],
        progress=False,
    )
    trainer.fit(make_batches(4), max_steps=4)
    assert cli.main(["inspect", str(directory), "--verify"]) == 0
    assert "2 complete of 2" in capsys.readouterr().out


def test_a_lock_naming_this_process_but_not_held_by_it_is_taken_over(tmp_path, caplog):
    # A restarted container often gets the same host name and PID as the run that held the
    # lock before it was killed; that holder is gone, since this process does not hold it.
    (tmp_path / lock.LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0})
    )
    lock.acquire(str(tmp_path))
    try:
        assert "Taking over the lock" in caplog.text
    finally:
        lock.release(str(tmp_path))
    assert not (tmp_path / lock.LOCK_FILE).exists()


def traced_steps(logdir):
    steps = set()
    for root, _, names in os.walk(logdir):
        for name in names:
            if name.endswith(".xplane.pb"):
                for plane in jax.profiler.ProfileData.from_file(os.path.join(root, name)).planes:
                    for line in plane.lines:
                        for event in line.events:
                            if event.name == "train":
                                steps.update(int(v) for k, v in event.stats if k == "step_num")
    return steps


def test_a_profile_placed_before_the_checkpoint_callback_decides_after_the_resume(tmp_path):
    def run(max_steps, logs):
        profile = nl.ProfileCallback(logs, start_step=1, num_steps=2)
        ckpt = nl.CheckpointCallback(tmp_path / "ckpt", every_steps=5)
        trainer = nl.Trainer(
            make_model(), tx(), loss_fn=loss_fn, callbacks=[profile, ckpt], progress=False
        )
        trainer.fit(make_batches(), max_steps=max_steps)

    run(5, tmp_path / "first")
    assert traced_steps(tmp_path / "first") == {1, 2}
    # The rerun resumes at step 5, past the window: it traces nothing (not its restore as
    # "step 1").
    run(12, tmp_path / "second")
    assert traced_steps(tmp_path / "second") == set()


def test_a_profile_to_a_url_is_refused():
    with pytest.raises(ValueError, match="local directory"):
        nl.ProfileCallback("gs://bucket/logs")


def test_mlflow_takes_more_than_a_hundred_hyperparameters(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    writer = nl.writers.MLflowWriter(tracking_uri=uri)
    hparams = {f"h{i}": i for i in range(150)}
    hparams["k" * 300] = "a key longer than MLflow's limit"
    writer.write_hparams(hparams)
    writer.write_scalars(1, {"loss": 0.5})
    writer.close()
    run = MlflowClient(tracking_uri=uri).get_run(writer.run_id)
    assert all(run.data.params[f"h{i}"] == str(i) for i in range(150))
    assert [m for m in run.data.metrics] == ["loss"]


def test_every_writer_is_closed_when_one_fails_to_close():
    class Failing(MetricWriter):
        def close(self):
            raise OSError(28, "No space left on device")

    class Recording(MetricWriter):
        closed = False

        def close(self):
            self.closed = True

    recording = Recording()
    with pytest.raises(OSError, match="No space"):
        MultiWriter([Failing(), recording]).close()
    assert recording.closed


@pytest.fixture(autouse=True)
def _cleanup(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)
