"""Runs every benchmark, one after the other, each in a process of its own.

    python benchmarks/run_all.py [--quick]

`--quick` passes on to each script (a smoke run). The peers need the `bench` extra
(`pip install -e ".[bench]"`); without it, `bench_peers.py` measures what is installed and
says what it skipped. A full run takes about 25 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

SCRIPTS = [
    "bench_step.py",
    "bench_peers.py",
    "bench_checkpoint.py",
    "bench_resume.py",
    "bench_mp_resume.py",
    "bench_slow_writer.py",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke-test every script")
    args = parser.parse_args(argv)
    here = pathlib.Path(__file__).resolve().parent
    failed = []
    for script in SCRIPTS:
        print(f"\n===== {script} =====", flush=True)
        command = [sys.executable, str(here / script)] + (["--quick"] if args.quick else [])
        if subprocess.run(command).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nFailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
