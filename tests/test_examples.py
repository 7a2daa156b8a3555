"""The examples run end to end (the digits one to its promised accuracy)."""

import importlib.util
import os
import pathlib

import pytest
from conftest import subprocess_env

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_digits_reaches_95_percent_and_resumes(tmp_path):
    digits = load("train_digits")
    final = digits.main(["--workdir", str(tmp_path)])
    assert final["accuracy"] >= 0.95
    assert (tmp_path / "logs" / "metrics.jsonl").exists()
    again = digits.main(["--workdir", str(tmp_path)])  # resumes: nothing left to train
    assert again == final


@pytest.mark.slow
def test_data_parallel_runs_on_8_fake_devices(tmp_path):
    import subprocess
    import sys

    env = subprocess_env()
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "data_parallel.py"),
            "--model-parallel",
            "2",
            "--epochs",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=True,
    ).stdout
    assert "8 devices, mesh {'data': 4, 'model': 2}" in out
    assert "P(None, 'model')" in out
    assert (tmp_path / "ckpt").is_dir()


@pytest.mark.slow
def test_custom_train_step_keeps_an_ema(tmp_path):
    import jax
    from flax import nnx

    import nnxloop as nl

    example = load("custom_train_step")
    metrics = example.main(["--epochs", "2", "--decay", "0.8", "--workdir", str(tmp_path)])
    assert metrics["accuracy"] > 0.5
    # The averages are part of the checkpoint, so a resumed run keeps them, and they differ
    # from the weights they average.
    model = nl.load_model(
        tmp_path / "ckpt", lambda: example.WithEma(example.DigitsMLP(rngs=nnx.Rngs(0)))
    )
    params = jax.tree.leaves(nnx.state(model.net, nnx.Param))
    assert len(model.ema) == len(params)
    assert not all((e[...] == p).all() for e, p in zip(model.ema, params))


@pytest.mark.slow
def test_char_lm_trains_with_async_checkpoints_and_logs(tmp_path):
    example = load("char_lm")
    metrics = example.main(
        [
            "--steps",
            "8",
            "--width",
            "32",
            "--layers",
            "1",
            "--seq-len",
            "16",
            "--batch-size",
            "8",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert metrics["bits_per_byte"] < 8.5  # below a uniform guess over 256 bytes (8 bits)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "6", "8"]  # saved every 2, keep 3
    assert (tmp_path / "logs" / "metrics.jsonl").exists()


@pytest.mark.extended
def test_resume_after_preemption_is_bitwise(tmp_path):
    example = load("resume_after_preemption")
    assert example.main(["--workdir", str(tmp_path), "--epochs", "2", "--stop-at", "10"])


@pytest.mark.slow
def test_one_device_per_process_runs_on_two_processes(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLES / "one_device_per_process.py"), "--epochs", "1"]
            + ["--workdir", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, 9)
                proc.wait(timeout=30)
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    finals = []
    for i, out in enumerate(outs):
        assert f"process {i} of 2: 1 local device(s), 2 in all" in out, out[-3000:]
        finals.append(out.split(f"process {i}: ", 1)[1].splitlines()[0])
    assert finals[0] == finals[1] and finals[0].startswith("step 22,")  # 22 steps an epoch
    # Each process saved its own grain iterator state with the checkpoints:
    files = os.listdir(tmp_path / "ckpt" / "20" / "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(files)
