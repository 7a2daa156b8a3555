"""Makes docs/images/profile-trace.png: TensorBoard's profile plugin showing steps 10-14.

It trains the digits example (examples/train_digits.py, scikit-learn's bundled data, nothing
downloaded) for one epoch of 22 steps with `nl.ProfileCallback(start_step=10, num_steps=5)`,
serves the trace with TensorBoard on 127.0.0.1, opens the plugin's Trace Viewer in headless
Chromium zoomed to steps 10-14, and saves a screenshot. The server is stopped and the
temporary log directory removed in every case.

Needs (none of it is in the project's extras, and CI never runs this script):

    apt-get install -y chromium          # headless browser, /usr/bin/chromium
    pip install -e ".[examples]"         # scikit-learn and grain, for the digits example
    pip install xprof playwright         # the profile plugin (older TensorBoard versions:
                                         # tensorboard-plugin-profile); playwright drives the
                                         # system Chromium, so no `playwright install`

Run from anywhere (made with xprof 2.24.2, tensorboard 2.21.0, playwright 1.65.2,
Chromium 156):

    python docs/screenshots/make_profile_screenshot.py [--out PNG] [--chromium PATH]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIRST_STEP, NUM_STEPS = 10, 5
STEPS = range(FIRST_STEP, FIRST_STEP + NUM_STEPS)
VIEWPORT = {"width": 1400, "height": 760}


def train_with_profile(logdir: pathlib.Path) -> None:
    """One epoch (22 steps) of the digits example, with steps 10-14 profiled."""
    import optax
    from flax import nnx

    import nnxloop as nl

    spec = importlib.util.spec_from_file_location(
        "train_digits", ROOT / "examples" / "train_digits.py"
    )
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)

    train, _ = digits.digits_datasets(batch_size=64)
    trainer = nl.Trainer(
        digits.DigitsMLP(rngs=nnx.Rngs(0)),
        optax.adamw(3e-3),
        loss_fn=digits.loss_fn,
        callbacks=[nl.ProfileCallback(logdir, start_step=FIRST_STEP, num_steps=NUM_STEPS)],
    )
    trainer.fit(train, epochs=1)
    assert trainer.step >= FIRST_STEP + NUM_STEPS, trainer.step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return json.loads(body)


def wait_for_server(server: subprocess.Popen, base: str, run: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"TensorBoard exited with code {server.returncode}")
        try:
            if run in get_json(f"{base}/data/plugin/profile/runs"):
                return
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(1)
    raise TimeoutError(f"TensorBoard's profile plugin did not list run {run} in {timeout} s")


def step_times(base: str, run: str, host: str) -> dict[int, tuple[float, float]]:
    """Start and end (ms) of the trace's "train N" step annotations for steps 10-14."""
    query = urllib.parse.urlencode({"run": run, "tag": "trace_viewer@", "host": host})
    trace = get_json(f"{base}/data/plugin/profile/data?{query}")
    found = {
        event["name"]: event
        for event in trace["traceEvents"]
        if event.get("ph") == "X" and event.get("name", "").startswith("train ")
    }
    missing = [f"train {step}" for step in STEPS if f"train {step}" not in found]
    if missing:
        raise RuntimeError(f"the trace has no {missing}; it has {sorted(found)}")
    # Trace event times are in microseconds, the trace viewer's view range in ms.
    return {
        step: (
            found[f"train {step}"]["ts"] / 1000,
            (found[f"train {step}"]["ts"] + found[f"train {step}"]["dur"]) / 1000,
        )
        for step in STEPS
    }


def screenshot(base: str, run: str, host: str, steps, out, chromium) -> None:
    from playwright.sync_api import sync_playwright

    start, end = steps[STEPS[0]][0], steps[STEPS[-1]][1]
    pad = 0.03 * (end - start)
    view = (start - pad, end + pad)
    selected = STEPS[len(STEPS) // 2]  # step 12, shown in the details panel

    find = 'input[placeholder="Find Events..."]'
    query = urllib.parse.urlencode({"run": run, "tag": "trace_viewer@", "host": host})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{base}/?{query}#profile")

            def trace_frame():
                for frame in page.frames:
                    if "trace_viewer_index.html" in frame.url:
                        return frame
                return None

            deadline = time.monotonic() + 60
            while trace_frame() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("the Trace Viewer did not open")
                page.wait_for_timeout(500)
            trace_frame().wait_for_selector(find, timeout=60_000)

            # The trace viewer takes its first view range from its own URL (view_start and
            # view_end, in ms): reload its frame with the range of steps 10-14.
            with page.expect_response(lambda r: "/data/plugin/profile/data?" in r.url):
                trace_frame().evaluate(
                    """([start, end]) => {
                        const url = new URL(location.href);
                        url.searchParams.set("view_start", start);
                        url.searchParams.set("view_end", end);
                        location.replace(url.toString());
                    }""",
                    [f"{view[0]:.4f}", f"{view[1]:.4f}"],
                )
            frame = trace_frame()
            assert f"view_start={view[0]:.4f}" in frame.url, frame.url
            frame.wait_for_selector(find, timeout=60_000)
            page.wait_for_timeout(3000)  # the timeline is drawn on a canvas

            # Click the middle step's annotation, as a reader would, to show its details.
            ruler = frame.locator("canvas").first.bounding_box()  # starts where the time axis does
            x = frame.evaluate(
                """(ms) => document.querySelector("tf-trace-viewer")._traceViewer.trackView
                    .viewport.currentDisplayTransform.xWorldToView(ms) / window.devicePixelRatio""",
                sum(steps[selected]) / 2,
            )
            row = frame.get_by_text("python", exact=False).first.bounding_box()  # top row
            page.mouse.click(ruler["x"] + x, row["y"] + row["height"] / 2)
            # Off the timeline (onto the details panel): no hover tooltip in the picture.
            page.mouse.move(ruler["x"] + 300, VIEWPORT["height"] - 20, steps=5)
            page.wait_for_timeout(1500)
            details = frame.evaluate("() => document.body.innerText")
            if f"train {selected}" not in details or "step_num" not in details:
                raise RuntimeError(f"step {selected} was not selected:\n{details[-1000:]}")
            page.screenshot(path=str(out))
        finally:
            browser.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "profile-trace.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="nnxloop-profile-shot-"))
    server = None
    try:
        logdir = tmp / "logs"
        train_with_profile(logdir)
        (run_dir,) = (logdir / "plugins" / "profile").iterdir()
        (xplane,) = run_dir.glob("*.xplane.pb")
        run, host = run_dir.name, xplane.name.removesuffix(".xplane.pb")

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server_log = open(tmp / "tensorboard.log", "w")  # closed in the finally below
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
            + ["--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one below
        )
        try:
            wait_for_server(server, base, run)
            steps = step_times(base, run, host)
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            screenshot(base, run, host, steps, out, args.chromium)
        except BaseException:
            server_log.flush()
            print((tmp / "tensorboard.log").read_text()[-5000:], file=sys.stderr)
            raise
        print(f"{out}: steps {STEPS[0]}-{STEPS[-1]} of run {run}, {out.stat().st_size} bytes")
    finally:
        if server is not None:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
            server_log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
