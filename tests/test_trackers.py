"""MetricsLogger's extra writers: MLflow (a real SQLite tracking store), W&B (real offline runs,
read back from the `.wandb` files they write), slow and failing ones."""

import glob
import logging
import os
import threading
import time
import zlib

import pytest
from conftest import loss_fn, make_batches, make_model, tx
from kill_and_rerun import TIMEOUT
from kill_and_rerun import subprocess_env as env_for

import nnxloop as nl
from nnxloop.writers.base import MetricWriter
from nnxloop.writers.combinators import BackgroundWriter, MultiWriter

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
        env=env_for(**wandb_env(workdir)),
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


def wandb_env(workdir) -> dict[str, str]:
    """W&B offline, quiet, and with its settings, caches and temporary directories under
    `workdir` (wandb makes two in the system's when imported, which a kill -9 leaves behind)."""
    os.makedirs(os.path.join(workdir, "tmp"), exist_ok=True)
    return {
        "TMPDIR": os.path.join(workdir, "tmp"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(workdir),
        "WANDB_CONFIG_DIR": os.path.join(workdir, "wandb-config"),
        "WANDB_CACHE_DIR": os.path.join(workdir, "wandb-cache"),
        "WANDB_DATA_DIR": os.path.join(workdir, "wandb-data"),
    }


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline in this process; its service process is stopped at the end."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # settings an earlier W&B run in this worker left: read afresh from here
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    for name, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    yield wandb
    wandb.teardown()


def wandb_records(path):
    """The protocol-buffer records of a `.wandb` file (LevelDB's log format after a 7-byte
    header: 32 KiB blocks of chunks, each with a CRC-32, a length and a type), up to the first
    chunk a killed run cut short."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    records, part, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail, too short for a chunk header
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        crc_ok = int.from_bytes(data[pos : pos + 4], "little") == zlib.crc32(bytes([kind]) + chunk)
        if kind == 0 or len(chunk) < length or not crc_ok:
            break
        pos += 7 + length
        part = chunk if kind in (1, 2) else part + chunk  # whole, first, middle, last
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(part))
    return records


def history_row(record):
    import json

    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}


def wandb_runs(workdir):
    """{run id: [(step, {key: value}) for every history row]}, over every offline run directory
    under `workdir`/wandb (a resumed run writes one more), in the order they were started."""
    files = []
    for path in glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")):
        # offline-run-<start time>-<id>, then -1, -2, ... for more started in the same second
        run_id = os.path.basename(path)[len("run-") : -len(".wandb")]
        name = os.path.basename(os.path.dirname(path))
        started = name.split("-")[2]
        again = int(name[len(f"offline-run-{started}-{run_id}-") :] or 0)
        records = wandb_records(path)  # a killed run's may hold no record at all
        rows = [(r.history.step.num, history_row(r)) for r in records if r.history.item]
        files.append((started, again, run_id, rows))
    runs = {}
    for _, _, run_id, rows in sorted(files):
        runs.setdefault(run_id, []).extend(rows)
    return runs


def wandb_services():
    """The wandb-core service processes this test process started, or that their scripts did."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "wandb-core" in line]


@pytest.mark.slow
def test_wandb_run_survives_a_kill_with_every_step_once(tmp_path):
    pytest.importorskip("wandb")
    before = wandb_services()
    run_script(tmp_path, "wandb", kill_after=13)  # checkpoint at 10; steps 12 logged, then lost
    run_script(tmp_path, "wandb")
    runs = wandb_runs(tmp_path)
    assert len(runs) == 1, "the resumed run continues the same W&B run"
    [(run_id, rows)] = runs.items()
    assert len(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))) == 2
    for key in ("loss", "accuracy", "steps_per_sec"):
        steps = [step for step, row in rows if key in row]
        assert steps == list(range(2, STEPS + 1, 2)), (key, steps)
    deadline = time.monotonic() + 10  # a service notices its script's end within a second
    while wandb_services() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert wandb_services() == before, "W&B's service processes end with the scripts"


def test_wandb_writer_logs_steps_config_and_texts(offline_wandb, tmp_path):
    writer = nl.writers.WandbWriter(project="unit", dir=str(tmp_path), name="first")
    writer.write_hparams({"lr": 0.01, "model": object()})
    writer.write_texts(0, {"parameters": "| a | b |"})
    writer.write_scalars(2, {"loss": 1.0})
    writer.write_scalars(4, {"val_loss": 2.0})
    writer.write_scalars(4, {"loss": 0.5})  # two lines at one step: one row
    assert writer.state_dict()["unsaved"], "W&B has not saved the last rows yet"
    writer.close()
    assert writer.state_dict() == {"run_id": writer.run_id, "unsaved": []}
    offline_wandb.teardown()  # W&B's service writes its last records as it stops
    records = wandb_records(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))[0])
    rows = [(r.history.step.num, set(history_row(r))) for r in records]
    assert [(step, keys & {"loss", "val_loss"}) for step, keys in rows if keys] == [
        (2, {"loss"}),
        (4, {"loss", "val_loss"}),
    ]
    config = {i.key: i.value_json for r in records for i in r.config.update}
    assert config["lr"] == "0.01" and config["model"].startswith('"<object')
    summary = {i.key: i.value_json for r in records for i in r.summary.update}
    assert summary["nnxloop/parameters"] == '"| a | b |"'
    with pytest.raises(ValueError, match="resumes its run itself"):
        nl.writers.WandbWriter(id="mine")


def test_a_failed_fit_ends_its_wandb_run_with_a_failure(offline_wandb, tmp_path):
    writer = nl.writers.WandbWriter(project="unit", dir=str(tmp_path))
    writer.write_scalars(2, {"loss": 1.0})
    writer.end_run("FAILED")
    writer.close()
    offline_wandb.teardown()  # W&B's service writes its last records as it stops
    records = wandb_records(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))[0])
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


def test_wandb_writer_resumes_its_run_and_logs_what_w_and_b_lost(offline_wandb, tmp_path):
    first = nl.writers.WandbWriter(project="unit", dir=str(tmp_path))
    for step in (2, 4, 6):
        first.write_scalars(step, {"loss": float(step)})
    first.close()  # W&B saved 2, 4, 6
    carried = {"run_id": first.run_id, "unsaved": [[6, {"loss": 6.0}], [8, {"loss": 8.0}]]}
    second = nl.writers.WandbWriter(project="unit", dir=str(tmp_path))
    second.load_state_dict(carried)  # a checkpoint at 8 whose process was killed
    for step in (6, 8, 10):  # resumed from 4: 6 is there, 8 was lost
        second.write_scalars(step, {"loss": float(step)})
    second.close()
    assert second.run_id == first.run_id
    [(run_id, rows)] = wandb_runs(tmp_path).items()
    assert [step for step, _ in rows] == [2, 4, 6, 8, 10]
    second.reset_state()
    second.write_scalars(1, {"loss": 1.0})
    second.close()
    assert second.run_id != first.run_id


def test_wandb_writer_carries_only_the_rows_w_and_b_has_not_saved(offline_wandb, tmp_path):
    writer = nl.writers.WandbWriter(project="unit", dir=str(tmp_path))
    for step in range(1, 801):  # more than W&B keeps in memory: it writes the first blocks
        writer.write_scalars(step, {f"metric_{i}": float(i) for i in range(10)})
    deadline = time.monotonic() + 20
    while len(writer.state_dict()["unsaved"]) == 800 and time.monotonic() < deadline:
        time.sleep(0.1)
    unsaved = [step for step, _ in writer.state_dict()["unsaved"]]
    assert 1 < unsaved[0] and unsaved == list(range(unsaved[0], 801)), unsaved[:3]
    writer.close()
    assert writer.state_dict()["unsaved"] == []


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


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_run_that_fails_or_is_interrupted_is_not_marked_finished(tmp_path, error):
    """A fit that raises ends its MLflow run FAILED (KILLED for Ctrl-C), not FINISHED: the
    tracker's run list must not show a crashed run as a completed one."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    writer = nl.writers.MLflowWriter(tracking_uri=uri, experiment="ends")

    class Fail(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 5:
                raise error("stop here")

    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.MetricsLogger(every_steps=2, writers=[writer]), Fail()],
    )
    with pytest.raises(error):
        trainer.fit(make_batches(), epochs=1)
    run = MlflowClient(tracking_uri=uri).get_run(writer.run_id)
    assert run.info.status == ("KILLED" if error is KeyboardInterrupt else "FAILED")
    steps = [
        m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "loss")
    ]
    assert steps == [2, 4]


def test_a_tracker_that_does_not_answer_holds_up_a_failing_run_only_briefly(monkeypatch, caplog):
    """After an error (or Ctrl-C), an extra writer gets a bounded time to finish: a tracker
    that hangs does not keep the process from reporting the error and exiting."""
    monkeypatch.setattr(nl.MetricsLogger, "CLOSE_TIMEOUT_AFTER_ERROR", 0.5)
    release = threading.Event()

    class Hanging(MetricWriter):
        def write_scalars(self, step, scalars):
            release.wait(30)

    class Fail(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 6:
                raise KeyboardInterrupt

    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.MetricsLogger(every_steps=2, writers=[Hanging()]), Fail()],
    )
    start = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="nnxloop"), pytest.raises(KeyboardInterrupt):
            trainer.fit(make_batches(), epochs=1)
        assert time.monotonic() - start < 15
        assert "Hanging did not finish within 0.5 s" in caplog.text
    finally:
        release.set()


def test_a_writer_reused_after_a_failed_fit_ends_the_next_clean_fit_finished(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    writer = nl.writers.MLflowWriter(tracking_uri=uri, experiment="reuse")

    class FailOnce(nl.Callback):
        failed = False

        def on_step_end(self, trainer, step, logs):
            if step == 3 and not self.failed:
                self.failed = True
                raise RuntimeError("once")

    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.MetricsLogger(every_steps=2, writers=[writer]), FailOnce()],
    )
    with pytest.raises(RuntimeError):
        trainer.fit(make_batches(), epochs=1)
    trainer.fit(make_batches(), epochs=1)  # goes on from step 3 and ends cleanly
    run = MlflowClient(tracking_uri=uri).get_run(writer.run_id)
    assert run.info.status == "FINISHED"


def test_a_writer_left_behind_after_an_error_writes_nothing_into_the_next_fit(monkeypatch):
    """A tracker that stalls past the close timeout of a failed fit: its old thread must not
    write that fit's waiting lines, nor end or close the run, while the next fit uses it."""
    monkeypatch.setattr(nl.MetricsLogger, "CLOSE_TIMEOUT_AFTER_ERROR", 0.2)
    calls = []
    second_fit = threading.Event()
    unstall = threading.Event()

    class StallsOnce(MetricWriter):
        stalled = False

        def write_scalars(self, step, scalars):
            if not self.stalled:
                self.stalled = True
                unstall.wait(30)  # until the second fit is under way
            calls.append(("write", step, second_fit.is_set()))

        def end_run(self, status):
            calls.append(("end_run", status, second_fit.is_set()))

        def close(self):
            calls.append(("close", None, second_fit.is_set()))

    class FailOnce(nl.Callback):
        failed = False

        def on_step_end(self, trainer, step, logs):
            if step == 6 and second_fit.is_set():
                unstall.set()  # the old thread wakes while this fit still runs
            time.sleep(0.05)
            if step == 4 and not self.failed:
                self.failed = True
                raise RuntimeError("once")

    writer = StallsOnce()
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.MetricsLogger(every_steps=1, writers=[writer]), FailOnce()],
    )
    with pytest.raises(RuntimeError):
        trainer.fit(make_batches(), epochs=1)
    second_fit.set()
    trainer.fit(make_batches(), epochs=1)
    time.sleep(0.5)  # what the old thread would still do, it has done by now
    # The call in flight (step 1's line) finishes when the tracker answers; the first fit's
    # lines 2..4 waiting behind it are dropped, and its end_run and close never reach the
    # writer the second fit uses. The second fit's lines all do.
    during_second = [c[:2] for c in calls if c[2] and c[:2] != ("write", 1)]
    assert during_second == [("write", s) for s in range(5, 13)] + [("close", None)]
