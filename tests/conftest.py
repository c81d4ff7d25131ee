"""Shared fixtures: a live JupyterLab driven by Playwright in Debian's Chromium.

Browser tests use the ``lab`` fixture::

    @pytest.mark.browser
    def test_widget(lab):
        page = lab.open("notebooks/00_quickstart.ipynb")
        lab.run_all(page)
        ...
        lab.screenshot(page, "after")

The server runs on 127.0.0.1 with a random free port, a random token and its
own configuration/runtime folders (kernel auto-start on, news and update
checks off). It is shut down when the test ends, pass or fail, and notebooks
opened through ``lab.open`` are restored byte for byte afterwards (JupyterLab
autosaves outputs into them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# two xdist workers on two cores: one BLAS/OpenMP thread each (kernels inherit it)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("IRIS_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
IDLE = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
RUN_ALL_TIMEOUT_MS = int(os.environ.get("IRIS_LAB_RUN_ALL_TIMEOUT_MS", 240_000))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_lab_settings(config_dir: Path) -> None:
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab"
    entries = {
        "notebook-extension/tracker.jupyterlab-settings": {
            "autoStartDefaultKernel": True, "windowingMode": "none"},
        "apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false", "checkForUpdates": False},
    }
    for name, value in entries.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


class Lab:
    """Handle on a running JupyterLab and the Playwright browser driving it."""

    def __init__(self, url: str, token: str, browser, shots: Path) -> None:
        self.url = url
        self.token = token
        self.browser = browser
        self.shots = shots
        self._backups: dict[Path, bytes] = {}
        self._pages: list = []

    def open(self, notebook: str, timeout_ms: int = 120_000):
        """Open ``notebook`` (path relative to the repository) in a new page."""
        path = REPO / notebook
        if not path.exists():
            raise FileNotFoundError(path)
        self._backups.setdefault(path, path.read_bytes())
        page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        self._pages.append(page)
        # a workspace of its own, reset: no notebook of an earlier test is restored beside it
        workspace = f"test-{secrets.token_hex(6)}"
        page.goto(f"{self.url}/lab/workspaces/{workspace}/tree/{notebook}"
                  f"?reset&token={self.token}")
        page.wait_for_selector(".jp-Notebook", timeout=timeout_ms)
        page.wait_for_selector(IDLE, timeout=timeout_ms)
        self._wait_for_settled_kernel(notebook, timeout_ms / 1000)
        return page

    def _wait_for_settled_kernel(self, notebook: str, timeout_s: float) -> None:
        """Wait until the notebook's session keeps one idle kernel for 3 s.

        JupyterLab may replace the first kernel right after the page loads; cells
        sent to the first one are lost.
        """
        deadline, last, stable_since = time.monotonic() + timeout_s, None, None
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.url}/api/sessions?token={self.token}") as r:
                sessions = json.load(r)
            kernels = [(s["kernel"]["id"], s["kernel"].get("execution_state"))
                       for s in sessions if s.get("path", "").endswith(Path(notebook).name)]
            current = kernels[0] if len(kernels) == 1 else None
            if current and current[1] == "idle" and current == last:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since >= 3.0:
                    return
            else:
                stable_since = None
            last = current
            time.sleep(0.5)
        raise AssertionError(f"the kernel of {notebook} did not settle within {timeout_s} s")

    def run_all(self, page, timeout_ms: int = RUN_ALL_TIMEOUT_MS) -> None:
        """Run every cell and wait until the kernel is idle again."""
        page.locator(".jp-Notebook").first.click()
        page.keyboard.press("Escape")
        # the first kernel may be replaced right after the page loads: retry until cells start
        for _attempt in range(4):
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel").filter(has_text="Run All Cells").first.click()
            try:
                page.wait_for_function(
                    """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
                        .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))""",
                    timeout=15_000)
                break
            except Exception:  # noqa: BLE001 - playwright's TimeoutError; try again
                page.keyboard.press("Escape")
        # notebooks are stored without outputs: done when every code cell has a number
        try:
            page.wait_for_function(
                """() => {
                    const prompts = [...document.querySelectorAll(
                        '.jp-CodeCell .jp-InputArea-prompt')];
                    return prompts.length > 0
                        && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
                }""",
                timeout=timeout_ms,
            )
        except Exception:
            shot = self.screenshot(page, "run_all_timeout")
            prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
            raise AssertionError(
                f"cells did not all run (prompts {prompts}); screenshot {shot}") from None
        page.wait_for_selector(IDLE, timeout=timeout_ms)
        errors = page.locator(STDERR)
        tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
        if tracebacks:
            raise AssertionError(f"notebook raised in the browser: {tracebacks[0][:2000]}")

    @staticmethod
    def pixel_readout(page, *, last: bool = True) -> str:
        """Text of the map widgets' readout label (``pixel y=.. x=..``)."""
        labels = page.locator(".widget-label", has_text=re.compile(r"^pixel y="))
        return (labels.last if last else labels.first).inner_text()

    @staticmethod
    def detail_image(page) -> str:
        """``src`` of the last image in a widget box (the map widgets' detail panel)."""
        return page.locator(".widget-vbox img").last.get_attribute("src")

    @staticmethod
    def wait_for_explorer(page, start: str) -> tuple[str, str]:
        """Wait until a map explorer shows its canvas, a readout starting with
        ``start`` and a detail image; return the readout and the image's ``src``."""
        page.wait_for_selector(".jupyter-matplotlib-canvas-div", timeout=120_000)
        page.wait_for_function(
            "s => [...document.querySelectorAll('.widget-label')]"
            ".some(l => l.textContent.startsWith(s))", arg=start, timeout=60_000)
        page.wait_for_function(
            "() => { const i = [...document.querySelectorAll('.widget-vbox img')];"
            " return i.length > 0 && !!i[i.length - 1].getAttribute('src'); }",
            timeout=60_000)
        return Lab.pixel_readout(page), Lab.detail_image(page)

    @staticmethod
    def click_map(page, fx: float, fy: float, start: str, before_png: str) -> str:
        """Click the last map canvas at the fractions ``(fx, fy)`` of its width and
        height (from the top left), wait until the readout no longer starts with
        ``start`` and the detail image has changed; return the new readout."""
        canvas = page.locator(".jupyter-matplotlib-canvas-div").last
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        assert box is not None and box["width"] > 100
        canvas.click(position={"x": fx * box["width"], "y": fy * box["height"]})
        page.wait_for_function(
            "s => [...document.querySelectorAll('.widget-label')]"
            ".some(l => l.textContent.startsWith('pixel y=') && !l.textContent.startsWith(s))",
            arg=start, timeout=60_000)
        page.wait_for_function(
            "old => { const i = [...document.querySelectorAll('.widget-vbox img')];"
            " return i.length > 0 && i[i.length - 1].getAttribute('src') !== old; }",
            arg=before_png, timeout=60_000)
        return Lab.pixel_readout(page)

    def screenshot(self, page, name: str) -> Path:
        """Save a PNG of the page under the test's tmp folder."""
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    def _shutdown_sessions(self) -> None:
        """Stop the kernels of the notebooks this test opened."""
        names = {path.name for path in self._backups}
        try:
            with urllib.request.urlopen(f"{self.url}/api/sessions?token={self.token}") as r:
                sessions = json.load(r)
            for session in sessions:
                if Path(session.get("path", "")).name in names:
                    request = urllib.request.Request(
                        f"{self.url}/api/sessions/{session['id']}?token={self.token}",
                        method="DELETE")
                    urllib.request.urlopen(request).close()
        except OSError:
            pass

    def restore(self) -> None:
        self._shutdown_sessions()
        for page in self._pages:
            try:
                page.close()
            except Exception:  # noqa: BLE001 - the browser may be gone already
                pass
        for path, content in self._backups.items():
            path.write_bytes(content)
        for checkpoints in {p.parent / ".ipynb_checkpoints" for p in self._backups}:
            shutil.rmtree(checkpoints, ignore_errors=True)


@pytest.fixture(scope="session")
def _lab_server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's 'chromium' package")
    root = tmp_path_factory.mktemp("jupyter")
    config_dir, runtime, data = root / "config", root / "runtime", root / "data"
    _write_lab_settings(config_dir)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config_dir), JUPYTER_RUNTIME_DIR=str(runtime),
               JUPYTERLAB_SETTINGS_DIR=str(config_dir / "lab" / "user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"),
               JUPYTER_DATA_DIR=str(data), MPLBACKEND="module://matplotlib_inline.backend_inline")
    # kernels must still be found after JUPYTER_DATA_DIR is redirected
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [
        str(Path(sys.prefix) / "share" / "jupyter"), env.get("JUPYTER_PATH", "")]))
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={REPO}", "--ServerApp.open_browser=False",
               "--LabApp.news_url=", "--allow-root"]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"jupyter lab exited early:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("jupyter lab did not start within 120 s") from None
                time.sleep(0.5)
        yield url, token
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.fixture(scope="session")
def _browser(_lab_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def lab(_lab_server, _browser, tmp_path) -> Iterator[Lab]:
    """A live JupyterLab + Chromium; notebooks restored and pages closed afterwards."""
    url, token = _lab_server
    handle = Lab(url, token, _browser, tmp_path)
    try:
        yield handle
    finally:
        handle.restore()
