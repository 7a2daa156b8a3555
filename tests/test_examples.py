"""The examples run end to end (the digits one to its promised accuracy)."""

import importlib.util
import pathlib

import pytest

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
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
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
