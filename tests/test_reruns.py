"""Rerunning a script that has ended, however it ended, does no update and ends with the same
parameters, bit for bit. (A run stopped by SIGTERM: tests/test_resume.py.)"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "finish_run.py")
TIMEOUT = 120


def start(workdir, how):
    env = subprocess_env()
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(workdir), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc):
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    return out, err


def value(out, word):
    return int(out.split(f"{word} ", 1)[1].split()[0])


def final_state(workdir):
    with np.load(os.path.join(workdir, "final.npz")) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


ENDS = {"early_stop": 6, "max_steps": 12, "stop_training": 4}


@pytest.mark.slow
def test_rerunning_a_finished_run_does_nothing(tmp_path):
    # The three scripts run side by side, each run and then rerun twice.
    dirs = {how: tmp_path / how for how in ENDS}
    outs = {how: finish(proc) for how, proc in [(h, start(d, h)) for h, d in dirs.items()]}
    firsts = {}
    for how, (out, _) in outs.items():
        assert value(out, "final") == ENDS[how], how
        firsts[how] = final_state(dirs[how])
    for _ in range(2):
        procs = [(how, start(d, how)) for how, d in dirs.items()]
        for how, proc in procs:
            out, err = finish(proc)
            assert value(out, "final") == ENDS[how] and value(out, "updates") == 0, how
            assert f"Training already finished at step {ENDS[how]}" in err, how
            assert_bitwise(final_state(dirs[how]), firsts[how])
