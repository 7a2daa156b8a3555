"""MetricsLogger's extra writers: MLflow (a real SQLite tracking store), slow and failing ones."""

import logging
import os
import threading

import pytest
from conftest import loss_fn, make_batches, make_model, tx
from kill_and_rerun import TIMEOUT
from kill_and_rerun import subprocess_env as env_for

import nnxloop as nl
from nnxloop.writers import BackgroundWriter, MetricWriter, MultiWriter

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 24  # 12 batches, 2 epochs


def run_script(workdir, uri, kill_after=None):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "tracker_run.py"), str(workdir), uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env_for(),
        cwd=workdir,
    )
    try:
        if kill_after is None:
            out, _ = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0 and "done" in out, out[-500:]
            return
        for line in proc.stdout:
            if line.strip() == f"step {kill_after}":
                break
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.mark.slow
def test_mlflow_run_survives_a_kill_with_every_step_once(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_script(tmp_path, uri, kill_after=13)  # checkpoint at 10; steps 12 logged, then lost
    run_script(tmp_path, uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kills")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resumed run continues the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("loss", "accuracy", "steps_per_sec"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(2, STEPS + 1, 2)), (key, sorted(steps))
    assert run.data.params["parameters"] and "nnxloop.parameters" in run.data.tags


def test_only_writers_without_a_logdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Collect(MetricWriter):
        def __init__(self):
            self.lines = []

        def write_scalars(self, step, scalars):
            self.lines.append((step, dict(scalars)))

    collect = Collect()
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.MetricsLogger(every_steps=4, writers=[collect])],
        progress=False,
    )
    trainer.fit(make_batches(), val_data=make_batches(2, seed=1), epochs=1)
    assert [s for s, line in collect.lines if "loss" in line] == [4, 8, 12]
    assert any("val_loss" in line for _, line in collect.lines)
    assert os.listdir(tmp_path) == []  # no files of its own
    with pytest.raises(ValueError, match="needs a logdir"):
        nl.MetricsLogger()
    with pytest.raises(TypeError, match="MetricWriter"):
        nl.MetricsLogger(writers=[print])


class Blocked(MetricWriter):
    """A writer that cannot write until `release` is set."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lines = []

    def write_scalars(self, step, scalars):
        self.entered.set()
        self.release.wait(timeout=30)
        self.lines.append(step)


def test_a_writer_that_cannot_keep_up_drops_the_oldest_lines_and_never_blocks(caplog):
    blocked = Blocked()
    writer = BackgroundWriter(blocked, max_pending=3)
    with caplog.at_level(logging.WARNING, logger="nnxloop"):
        writer.write_scalars(1, {"loss": 1.0})
        assert blocked.entered.wait(timeout=30)  # line 1 is being written, and stuck
        for step in range(2, 11):  # each call returns at once although nothing is written
            writer.write_scalars(step, {"loss": 1.0})
    blocked.release.set()
    writer.flush()
    writer.close()
    # Line 1 was being written; of the rest, the newest 3 waited and 2 to 7 were dropped.
    assert blocked.lines == [1, 8, 9, 10]
    assert writer.dropped == 6
    assert caplog.text.count("cannot keep up") == 1


def test_a_failing_writer_is_reported_once_and_training_goes_on(tmp_path, caplog):
    class Broken(MetricWriter):
        def write_scalars(self, step, scalars):
            raise ConnectionError("tracking server unreachable")

    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.MetricsLogger(tmp_path / "logs", every_steps=2, writers=[Broken()])],
        progress=False,
    )
    with caplog.at_level(logging.WARNING, logger="nnxloop"):
        trainer.fit(make_batches(), max_steps=8)
    assert trainer.step == 8
    assert caplog.text.count("Broken failed") == 1 and "unreachable" in caplog.text
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # the files have every line


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
