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
