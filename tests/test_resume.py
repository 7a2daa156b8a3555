"""Killing a run at any moment and rerunning it ends with the same state, bit for bit."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import subprocess_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "resume_run.py")
TIMEOUT = 120


def start(workdir, mode):
    env = subprocess_env()
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(workdir), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def run_to_end(workdir, mode, *, output=False):
    proc = start(workdir, mode)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "done" in out, out[-500:]
    started = int(out.split("start ", 1)[1].split()[0])
    return (started, out) if output else started


def run_and_kill(workdir, mode, kill_after_step, delay):
    """Runs until it prints `step kill_after_step`, waits `delay`, then SIGKILLs it."""
    proc = start(workdir, mode)
    deadline = time.monotonic() + TIMEOUT
    try:
        for line in proc.stdout:
            if time.monotonic() > deadline:
                break
            if line.strip() == f"step {kill_after_step}":
                time.sleep(delay)
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()


def final_state(workdir):
    with np.load(os.path.join(workdir, "final.npz")) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(workdir, "sync")
    return final_state(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_three_times_ends_bitwise_equal(mode, reference, tmp_path):
    rng = random.Random(f"{mode}-kills")
    # 40 steps in all; kill points spread over the run, some right on save steps (multiples of 3)
    kills = sorted(rng.sample(range(6, 38), 3))
    for kill_after in kills:
        run_and_kill(tmp_path, mode, kill_after, delay=rng.uniform(0.0, 0.03))
    started_at = run_to_end(tmp_path, mode)
    assert started_at > 0, "the rerun started from scratch instead of resuming"
    got = final_state(tmp_path)
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_resumes_exactly(reference, tmp_path):
    proc = start(tmp_path, "async")
    try:
        for line in proc.stdout:
            if line.strip() == "step 11":
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.stdout.close()
    assert proc.returncode == 0
    stopped = int(out.split("preempted ", 1)[1].split()[0])
    assert 11 <= stopped <= 13  # the step in flight when the signal came, not a later save
    assert str(stopped) in os.listdir(tmp_path / "ckpt")
    assert run_to_end(tmp_path, "async") == stopped
    for a, b in zip(final_state(tmp_path), reference):
        assert np.array_equal(a, b)
    # Run once more: the run has finished, so nothing is trained and the result stands.
    started, out = run_to_end(tmp_path, "async", output=True)
    assert started == 40 and "step " not in out
    for a, b in zip(final_state(tmp_path), reference):
        assert np.array_equal(a, b)
