"""The `nnxloop` command: `nnxloop inspect DIR [--step N]`.

Lists the checkpoints in a directory, or shows one step's arrays and metadata. Only metadata
files are read, so a directory written on other hardware (another device count, a TPU pod) can
be inspected on a laptop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from nnxloop.checkpointing import (
    COMPLETE,
    UNREADABLE,
    ArraySummary,
    CheckpointError,
    StepSummary,
    best_step,
    list_checkpoints,
    read_step,
)

EXIT_DAMAGED = 1
EXIT_ERROR = 2


def human_size(n_bytes: int) -> str:
    """`1536` -> `"1.5 KiB"`."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _local_time(timestamp: Any) -> str:
    if not isinstance(timestamp, int | float) or not math.isfinite(timestamp):
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _metrics_text(summary: StepSummary) -> str:
    best = (summary.meta or {}).get("best")
    if best is not None:
        return f"{best['monitor']}={best['value']:.6g}"
    if summary.metrics:
        return ", ".join(
            f"{k}={v:.6g}" if isinstance(v, int | float) else f"{k}={v}"
            for k, v in sorted(summary.metrics.items())
        )
    return "-"


def _status_text(summary: StepSummary) -> str:
    if summary.status == COMPLETE:
        return COMPLETE
    if summary.error is not None:
        return f"{summary.status} ({summary.error})"
    return f"{summary.status} ({summary.name})"


def _table(header: Sequence[str], rows: list[Sequence[str]], *, right: set[int]) -> str:
    """Plain aligned columns; columns in `right` are right-aligned; the last is left ragged."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ]
        cells[-1] = row[-1]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in [header, *rows])


def format_listing(directory: str, summaries: list[StepSummary], *, verified: bool = False) -> str:
    """The table `nnxloop inspect DIR` prints: one row per step directory.

    `verified` says in the first line that every array was read (`--verify`).
    """
    best = best_step(summaries)
    rows = [
        (
            str(s.step),
            _local_time((s.meta or {}).get("time")),
            human_size(s.size_bytes),
            _metrics_text(s),
            "*" if s.step == best and s.status == COMPLETE else "",
            _status_text(s),
        )
        for s in summaries
    ]
    table = _table(("STEP", "TIME", "SIZE", "METRICS", "BEST", "STATUS"), rows, right={0, 2})
    n_complete = sum(s.status == COMPLETE for s in summaries)
    checked = "every array read" if verified else "arrays not read; --verify reads them"
    return (
        f"{directory}: {n_complete} complete of {len(summaries)} step directories ({checked})\n"
        f"{table}"
    )


def _shape_text(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "-"
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def format_step(
    directory: str, step: int, arrays: dict[str, list[ArraySummary]], meta: dict[str, Any] | None
) -> str:
    """What `nnxloop inspect DIR --step N` prints: the arrays of each item, then `meta`."""
    parts = [f"{directory}, step {step}"]
    for item, leaves in arrays.items():
        n_values = sum(math.prod(a.shape) for a in leaves if a.shape is not None)
        rows = [(a.path, _shape_text(a.shape), a.dtype, a.sharding) for a in leaves]
        parts.append(
            f"\n{item}: {len(leaves)} arrays, {n_values:,} values\n"
            + _table(("PATH", "SHAPE", "DTYPE", "SHARDING (as saved)"), rows, right=set())
        )
    if meta is None:
        parts.append("\nmeta: none (not written by nnxloop)")
    else:
        # The tree above already shows the shapes.
        shown = {k: v for k, v in meta.items() if k != "model_shapes"}
        parts.append("\nmeta:\n" + json.dumps(shown, indent=2))
    return "\n".join(parts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnxloop", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="list the checkpoints in a directory, or show one step's arrays",
        description="Lists the checkpoints in DIR (step, time, size, metrics, best, status); "
        "with --step, shows that step's arrays (path, shape, dtype, sharding) and metadata. "
        "Reads metadata only, unless --verify: then every array of every step is read back.",
    )
    inspect.add_argument("directory", metavar="DIR", help="a checkpoint directory")
    inspect.add_argument("--step", type=int, metavar="N", help="show the arrays of step N")
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="read every array of every step (finds truncated or corrupted array files); "
        "exit 1 when a committed step does not read",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `nnxloop` command line.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.

    Returns:
        The exit status: 0; 1 when `--verify` found a committed step whose arrays do not
        read (named on stderr); or 2 after printing a one-line error to stderr (no such
        directory, not a checkpoint directory, no such step, unreadable step).

    Example:
        ```console
        $ nnxloop inspect runs/exp/best
        $ nnxloop inspect runs/exp/ckpt --step 1000
        $ nnxloop inspect runs/exp/ckpt --verify
        ```
    """
    args = _parser().parse_args(argv)
    try:
        if args.step is None:
            summaries = list_checkpoints(args.directory, verify=args.verify)
            print(format_listing(args.directory, summaries, verified=args.verify))
            damaged = [s.step for s in summaries if s.status == UNREADABLE and s.error]
            if args.verify and damaged:
                steps = ", ".join(f"step {n}" for n in damaged)
                print(
                    f"nnxloop inspect --verify: {steps} of {args.directory} "
                    f"{'does' if len(damaged) == 1 else 'do'} not read; "
                    "a resume sets a damaged newest step aside and uses the one before.",
                    file=sys.stderr,
                )
                return EXIT_DAMAGED
        else:
            arrays, meta = read_step(args.directory, args.step)
            print(format_step(args.directory, args.step, arrays, meta))
    except CheckpointError as exc:
        print(f"nnxloop inspect: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
