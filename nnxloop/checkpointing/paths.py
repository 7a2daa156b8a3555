"""Checkpoint directories as orbax takes them: a local path or a `gs://` URL, never one
rewritten into the other.

Local paths are made absolute (orbax needs that); a URL is kept as it is and reached through
`etils.epath`, the same path layer orbax uses. orbax writes arrays (through tensorstore) to local
file systems and Google Cloud Storage only, so any other URL scheme is refused up front.
"""

from __future__ import annotations

import os

from etils import epath

from nnxloop.checkpointing.errors import CheckpointError

#: URL schemes orbax-checkpoint can write a checkpoint to.
SUPPORTED_SCHEMES = ("gs",)


def scheme(directory: str | os.PathLike[str]) -> str | None:
    """`"gs"` for `"gs://b/run"`, None for a local path."""
    text = os.fspath(directory)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.isidentifier() else None


def is_remote(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` is a URL (an object store) rather than a local path."""
    return scheme(directory) is not None


def checkpoint_directory(directory: str | os.PathLike[str], *, what: str) -> str:
    """`directory` as nnxloop keeps it: a local path made absolute, or a supported URL as given
    (without a trailing slash).

    Raises:
        CheckpointError: a URL whose scheme orbax cannot write to (`s3://`, `az://`, ...).
    """
    text = os.fspath(directory)
    kind = scheme(text)
    if kind is None:
        return os.path.abspath(text)
    if kind not in SUPPORTED_SCHEMES:
        raise CheckpointError(
            f"{what} {text}: orbax-checkpoint writes checkpoints to local paths and gs:// "
            f"buckets only, not to {kind}:// URLs. Mount the bucket as a local file system "
            "(e.g. mountpoint-s3, blobfuse2) and pass the mount's path, or use a gs:// bucket."
        )
    return text.rstrip("/")


def path(directory: str) -> epath.Path:
    """An `epath.Path` for a directory returned by `checkpoint_directory`."""
    return epath.Path(directory)
