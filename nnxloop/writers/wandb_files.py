"""Reading the steps a Weights & Biases run has saved, from its `.wandb` files (for
`nl.writers.WandbWriter`, in `nnxloop.trackers`, which must not log a step twice after a resume)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

# A W&B run's `.wandb` file is LevelDB's log format after a 7-byte header (":W&B", a magic
# number, a version): 32 KiB blocks of chunks, each with a header of a CRC-32 (IEEE, of the
# chunk's type and data), the data's length and the chunk's type (a whole record, or its
# first, a middle or its last part); a block's last bytes, too few for a header, are zeros.
_HEADER = 7
_BLOCK = 32 * 1024
_CHUNK = 7


def records(path: str, offset: int = 0) -> Iterator[tuple[bytes, int]]:
    """The records of a `.wandb` file from `offset` (0, or an offset this returned), each with
    the offset after it. Stops at the first chunk that is cut short or damaged: the end of
    what W&B has written so far, or of what a killed run wrote."""
    with open(path, "rb") as f:
        if f.read(4) != b":W&B":
            return
        start = max(offset, _HEADER)
        f.seek(start)
        data = f.read()
    pos = start  # in the file; data[pos - start] is the byte at pos
    parts: list[bytes] = []
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK:
            pos += left
            continue
        at = pos - start
        head = data[at : at + _CHUNK]
        if len(head) < _CHUNK:
            return
        crc = int.from_bytes(head[:4], "little")
        length = int.from_bytes(head[4:6], "little")
        kind = head[6]
        body = data[at + _CHUNK : at + _CHUNK + length]
        if kind == 0 or len(body) < length or zlib.crc32(head[6:] + body) != crc:
            return
        pos += _CHUNK + length
        if kind == 1:  # a whole record
            yield body, pos
        elif kind == 2:  # its first part
            parts = [body]
        elif kind == 3:
            parts.append(body)
        elif kind == 4:  # its last part
            yield b"".join([*parts, body]), pos
        else:
            return


def history_steps(path: str, offset: int = 0) -> tuple[list[int], int]:
    """The steps of the history rows in a `.wandb` file from `offset`, and the offset after
    the last whole record."""
    from wandb.proto import wandb_internal_pb2

    record_type: Any = wandb_internal_pb2.Record  # pyright: ignore[reportAttributeAccessIssue]
    steps: list[int] = []
    end = offset
    for raw, after in records(path, offset):
        record = record_type.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            steps.append(record.history.step.num)
        end = after
    return steps, end


def last_step(path: str) -> int:
    return max(history_steps(path)[0], default=-1)
