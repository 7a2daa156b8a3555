"""Two processes on 127.0.0.1 (gloo collectives), in both layouts: one CPU device per process
(one accelerator per process, as most clusters launch) and two per process."""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import injected_sgd, loss_fn, make_batches, make_model, subprocess_env
from flax import nnx

import nnxloop as nl

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 150
LAYOUTS = [1, 2]  # devices per process
LEARNING_RATE = 0.03  # what multiprocess_run.py sets before its fit


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, devices, step_seconds=0.02):
    port = free_port()
    env = subprocess_env(PYTHONUNBUFFERED="1", STEP_SECONDS=str(step_seconds))
    return [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "multiprocess_run.py"),
                str(i),
                str(port),
                str(workdir),
                str(devices),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]


def finish(procs, timeout=TIMEOUT):
    outs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    return outs


def wait_for(proc, line, timeout=TIMEOUT):
    """Reads `proc`'s output until `line`; returns what was read."""
    seen, deadline = [], time.monotonic() + timeout
    for text in proc.stdout:
        seen.append(text)
        if text.strip() == line or time.monotonic() > deadline:
            break
    return "".join(seen)


def npz(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda d: f"{d}-device-per-process")
def two_process_run(request, tmp_path_factory):
    """A run never stopped, in each layout: (workdir, outputs, devices per process)."""
    workdir = tmp_path_factory.mktemp(f"two_processes_{request.param}")
    outs = finish(launch(workdir, request.param))
    return workdir, outs, request.param


@pytest.mark.slow
def test_processes_agree_and_match_one_process(two_process_run):
    workdir, outs, _ = two_process_run
    for out in outs:
        assert "done 36" in out, out[-2000:]
    p0, p1 = npz(workdir / "final_0.npz"), npz(workdir / "final_1.npz")
    for a, b in zip(p0, p1):
        assert np.array_equal(a, b)  # every process holds the same parameters, bitwise

    # One process with 4 devices and the same global batches and learning rate:
    trainer = nl.Trainer(make_model(), injected_sgd(), loss_fn=loss_fn, steps_per_dispatch=2)
    trainer.set_learning_rate(LEARNING_RATE)
    trainer.fit(make_batches(n_batches=12), epochs=3)
    one = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))]
    for a, b in zip(p0, one):
        np.testing.assert_allclose(a, b, atol=1e-5)

    # The checkpoint they wrote together loads in a single process:
    loaded = nl.load_model(workdir / "ckpt", make_model)
    for a, b in zip(p0, jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        assert np.array_equal(a, np.asarray(b))


@pytest.mark.slow
def test_only_process_0_logs(two_process_run):
    workdir, _, _ = two_process_run
    events = [n for n in os.listdir(workdir / "logs") if n.startswith("events")]
    assert len(events) == 1
    with open(workdir / "logs" / "metrics.jsonl") as f:
        steps = [line.split('"step": ')[1].split(",")[0] for line in f if '"loss"' in line]
    assert steps == [str(s) for s in range(4, 37, 4)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_and_the_rerun_ends_bitwise(
    two_process_run, tmp_path, caplog
):
    never_stopped, _, devices = two_process_run
    # Slow steps (0.2 s each): the processes agree on the stop within a few steps, wherever
    # the machine's load puts the signal, so the stop is well before the run's end.
    procs = launch(tmp_path, devices, step_seconds=0.2)
    try:
        wait_for(procs[1], "step 14")  # mid-epoch (12 steps each): the stop is too, mostly
        procs[1].send_signal(signal.SIGTERM)
    finally:
        outs = finish(procs)
    stops = [int(out.split("preempted ", 1)[1].split()[0]) for out in outs]
    assert stops[0] == stops[1] and 14 <= stops[0] < 36
    assert str(stops[0]) in os.listdir(tmp_path / "ckpt")
    assert all(p.returncode == 0 for p in procs)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "for_one_process")

    # The rerun of the same command restores each process's own iterator state (no replay of
    # the consumed batches) and ends where the run never stopped ends, bit for bit.
    procs = launch(tmp_path, devices)
    outs = finish(procs)
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:]
    position = stops[0] % 12
    for process_id, out in enumerate(outs):
        assert "done 36" in out, out[-3000:]
        if position:  # a stop on an epoch's end opens the next epoch from its start
            assert f"set_state {process_id} {position}" in out, out[-3000:]
        assert "by iterating" not in out, out[-3000:]
    for i in range(2):
        for a, b in zip(npz(tmp_path / f"final_{i}.npz"), npz(never_stopped / "final_0.npz")):
            assert np.array_equal(a, b)

    # Resumed by one process, the checkpoint holds no iterator state for it: it replays the
    # consumed batches, saying why, and trains on to the end.
    class Batches:  # global batches, from an iterator with no state
        def __iter__(self):
            return iter(make_batches(n_batches=12))

    trainer = nl.Trainer(
        make_model(),
        injected_sgd(),
        loss_fn=loss_fn,
        steps_per_dispatch=2,
        callbacks=[nl.CheckpointCallback(tmp_path / "for_one_process", every_steps=4)],
    )
    with caplog.at_level(logging.WARNING, logger="nnxloop"):
        trainer.fit(Batches(), epochs=3)
    assert trainer.step == 36
    if position:
        assert "written by 2 process(es) and this run has 1" in caplog.text, caplog.text
        assert f"skipped {position} batches by iterating over the list_iterator" in caplog.text


@pytest.mark.slow
def test_a_dead_process_makes_the_other_fail_fast(tmp_path):
    # What notices the loss (gloo's collective, JAX's coordination service) does not depend
    # on the local device count: the one-device layout is enough here.
    procs = launch(tmp_path, 1)
    try:
        wait_for(procs[1], "step 6")
        os.kill(procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        out, _ = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        finish(procs, timeout=30)
    assert procs[0].returncode != 0
    assert elapsed < 30  # heartbeat timeout is 5 s in the script; no hang
    # Which message comes first depends on timing: the collective's own failure, or JAX's
    # coordination service naming the lost task after its heartbeat timeout.
    assert any(
        sign in out for sign in ("Task 1 heartbeat timeout", "another task died", "closed by peer")
    ), out[-3000:]
