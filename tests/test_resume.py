"""Killing a run at any moment and rerunning it ends with the same state, bit for bit."""

import os
import random
import signal

import numpy as np
import pytest
from kill_and_rerun import TIMEOUT, final_state, run_and_kill, run_to_end, start


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_twice_ends_bitwise_equal(mode, reference, tmp_path):
    rng = random.Random(f"{mode}-kills")
    # 40 steps in all; kill points spread over the run, some right on save steps (multiples of 3)
    kills = sorted(rng.sample(range(6, 38), 2))
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
