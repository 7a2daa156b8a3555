"""The benchmark scripts run in --quick mode (in subprocesses, each with its own devices)."""

import pathlib
import subprocess
import sys

import pytest
from conftest import subprocess_env

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def run(args: list[str]) -> str:
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.extended
def test_bench_step_quick():
    out = run([str(BENCHMARKS / "bench_step.py"), "--quick"])
    assert "784-32-32-10 b32" in out
    assert "nnxloop K=8" in out


@pytest.mark.extended
def test_bench_slow_writer_quick():
    out = run([str(BENCHMARKS / "bench_slow_writer.py"), "--quick"])
    assert "ratio per pair" in out and "log every 500" in out


@pytest.mark.extended
def test_bench_accumulation_quick_meets_its_memory_bound():
    out = run([str(BENCHMARKS / "bench_accumulation.py"), "--quick"])
    assert "accumulate N=4" in out and "-> met" in out


@pytest.mark.extended
def test_bench_checkpoint_quick_reports_every_row_and_cleans_up(tmp_path):
    out = run([str(BENCHMARKS / "bench_checkpoint.py"), "--quick", "--dir", str(tmp_path)])
    for row in ("sync save, blocked", "async save, until on disk", "resumed fit", "dd conv"):
        assert row in out
    assert "async saving / no saving" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.extended
def test_bench_peers_quick_skips_the_peers_that_are_missing():
    # As in CI, which installs only the test extra: importing a peer fails.
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "sys.modules.update(keras=None, torch=None, lightning=None)\n"
        f"sys.argv = [{str(BENCHMARKS / 'bench_peers.py')!r}, '--quick']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    out = run(["-c", code])
    assert "flax @nnx.jit" in out
    for peer in ("keras", "torch", "lightning"):
        assert f"{peer:18s} skipped: not installed" in out


@pytest.mark.extended
def test_bench_mp_resume_quick_resumes_both_ways_and_cleans_up(tmp_path):
    # The script checks that every timed process resumed at the checkpoint's step.
    out = run([str(BENCHMARKS / "bench_mp_resume.py"), "--quick", "--dir", str(tmp_path)])
    for row in ("saved state  after     20", "replay       after    200", "floor (saved state"):
        assert row in out, out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.extended
@pytest.mark.parametrize("args", [["--repeats", "0"], ["--consumed", "200,many"]])
def test_bench_mp_resume_refuses_bad_arguments(args):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_mp_resume.py"), *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--" in proc.stderr, proc.stderr


@pytest.mark.extended
def test_bench_resume_quick_resumes_and_cleans_up(tmp_path):
    # The script itself asserts that the resumed process's first step is the one after the
    # checkpoint (and that the fresh one's is step 1).
    out = run([str(BENCHMARKS / "bench_resume.py"), "--quick", "--dir", str(tmp_path)])
    for row in ("fresh start", "resumed start", "resuming adds"):
        assert row in out
    assert list(tmp_path.iterdir()) == []
