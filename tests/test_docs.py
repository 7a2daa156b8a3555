"""Every Python code block in the README and the docs pages runs."""

import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks():
    for page in PAGES:
        text = page.read_text()
        # A page's blocks run in order in one namespace, as a reader would paste them.
        code = [m.group(1) for m in BLOCK.finditer(text)]
        if code and "<!-- no-test -->" not in text:
            yield pytest.param(page, code, id=str(page.relative_to(ROOT)))


@pytest.mark.slow
@pytest.mark.parametrize(("page", "code"), list(blocks()))
def test_page_code_runs(page, code, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    # A page that checkpoints to gs:// buckets runs against a real GCS API server.
    buckets = sorted(set(re.findall(r"gs://([a-z0-9][a-z0-9._-]+)", "".join(code))))
    if buckets:
        server, _ = request.getfixturevalue("gcs")
        for name in buckets:
            server.create_bucket(name)
    try:
        for i, block in enumerate(code):
            exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
    finally:
        # A page with a W&B run leaves wandb's settings and service process behind in this
        # worker (and WANDB_SERVICE in its environment): the tests after it start afresh.
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()
            os.environ.pop("WANDB_SERVICE", None)
    assert not (tmp_path / "gs:").exists()
