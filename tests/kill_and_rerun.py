"""Running `resume_run.py` in a subprocess, killing it, and reading its final state."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import subprocess_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "resume_run.py")
TIMEOUT = 120


def start(workdir, mode, root=None, env=None, every=3):
    """Starts the script: checkpoints under `root` (default `workdir`) every `every` steps,
    with extra `env` variables."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(workdir), mode, str(root or workdir), str(every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=subprocess_env(**(env or {})),
        cwd=workdir,
    )


def run_to_end(workdir, mode, *, output=False, root=None, env=None, every=3):
    proc = start(workdir, mode, root, env, every)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "done" in out, out[-500:]
    started = int(out.split("start ", 1)[1].split()[0])
    return (started, out) if output else started


def run_and_kill(workdir, mode, kill_after_step, delay, *, root=None, env=None, every=3):
    """Runs until it prints `step kill_after_step`, waits `delay`, then SIGKILLs it."""
    proc = start(workdir, mode, root, env, every)
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
