"""The installed package's version, for `nnxloop.__version__` and checkpoint metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The version pip installed, or `0.0.0+unknown` in a source tree never installed."""
    try:
        return version("nnxloop")
    except PackageNotFoundError:
        return "0.0.0+unknown"
