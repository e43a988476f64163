"""The inspect page in a real browser: Debian's headless Chromium, driven over its own
DevTools pipe (`--remote-debugging-pipe`, no driver package, never a downloaded browser).

Opens generated pages from file:// and checks: no console errors, no exceptions and no
request for anything but the page itself; one element per character; choosing another unit
(a real key press) changes the colours and repaints fast; the Transformer's attention view
colours only earlier characters; hostile text is shown as text. Saves screenshots. Skips,
saying why, where no Chromium is installed (.ci/run installs it, so CI runs this).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_inspect import HOSTILE, make_run

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser") if shutil.which(b)),
               None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium found (apt-get install chromium; .ci/run installs it for CI)")


class Browser:
    """Headless Chromium over the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4: a shell moves the pipe
        # ends there from stdin and stdout (no preexec_fn, which is unsafe with threads).
        wire = 'exec 3<&0 4>&1 0</dev/null 1>/dev/null; exec "$@"'
        args = ["/bin/sh", "-c", wire, "sh", BROWSER, "--headless", "--remote-debugging-pipe",
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=to_browser_r, stdout=from_browser_w,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._id, self.events = b"", 0, []
        target = next(t for t in self.call("Target.getTargets")["targetInfos"]
                      if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=target["targetId"],
                                 flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.page(f"{domain}.enable")
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def page(self, method: str, **params):
        return self.call(method, session=self.session, **params)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def eval(self, expression: str):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, path: Path, timeout: float = 30) -> None:
        """Load `path` from file:// and wait until the page says it is ready (or failed)."""
        self.page("Page.navigate", url=path.resolve().as_uri())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.eval("document.body && document.body.dataset.ready") == "1":
                    return
            except RuntimeError:
                pass  # between documents
            time.sleep(0.05)
        status = self.eval("document.getElementById('status').textContent")
        raise TimeoutError(f"page never got ready; status: {status}")

    def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                      windowsVirtualKeyCode=code)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                        "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                        "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        self.eval("window.scrollTo(0, 0)")
        data = self.page("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))

    def problems(self, page_url: str) -> list[str]:
        """Console errors, uncaught exceptions, error log entries (CSP violations, failed
        loads) and every request for anything but the page itself, seen so far."""
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error",
                                                                                 "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')}")
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if url != page_url and not url.startswith(("data:", "blob:", "about:")):
                    found.append(f"request: {url}")
        return found

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its own process group: the browser and its helpers
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def marker(c: str) -> str:
    """What the page shows for character c: whitespace and control characters visibly."""
    named = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u21e5", "\x7f": "\u2421"}
    return named.get(c, chr(0x2400 + ord(c)) if ord(c) < 32 else c)


COLOURS = "Array.from(document.querySelectorAll('#text .ch'), s => s.style.backgroundColor)"


def test_lstm_page_in_a_real_browser(tmp_path, browser):
    from charlm.inspect import inspect_run

    text = "first line\n\tsecond (line) \"quoted\"\nthird: ünïcødé ✓ 🙂\n" * 4
    ckpt = make_run(tmp_path, "lstm", extra=text)
    page = inspect_run(ckpt, prime=text, out=tmp_path / "lstm.html").path
    browser.open(page)
    assert browser.eval("document.querySelectorAll('#text .ch').length") == len(text)
    surprise = browser.eval(COLOURS)
    browser.click("#tabs button[data-mode='unit']")  # view 2: one unit
    first_unit = browser.eval(COLOURS)
    assert first_unit != surprise
    browser.click("#text .ch")
    browser.key("ArrowUp", 38)  # the next unit, from the keyboard
    assert browser.eval("document.getElementById('unit').value") == "1"
    second_unit = browser.eval(COLOURS)
    assert second_unit != first_unit
    assert float(browser.eval("document.body.dataset.paintMs")) < 1000  # (a loose bound)
    browser.key("ArrowRight", 39)  # the keyboard moves between characters; the panel follows
    info = browser.eval("document.getElementById('info').textContent")
    assert "character 2 of" in info and "guessed" in info
    browser.click("#features button.match")  # view 3: a unit that explains itself
    assert browser.eval("location.hash").startswith("#l")
    assert browser.eval("document.querySelectorAll('#saturation circle').length") == 3 * 2 * 16
    browser.screenshot(tmp_path / "lstm.png")
    assert (tmp_path / "lstm.png").stat().st_size > 10_000
    assert browser.problems(page.resolve().as_uri()) == []


def test_transformer_attention_in_a_real_browser(tmp_path, browser):
    from charlm.inspect import inspect_run

    ckpt = make_run(tmp_path, "transformer")
    text = "to be, or not to be: that is the question.\n" * 3
    page = inspect_run(ckpt, prime=text, out=tmp_path / "tf.html").path
    browser.open(page)
    browser.eval("location.hash = ''")
    browser.click("#tabs button[data-mode='unit']")
    browser.eval("(() => { const q = document.getElementById('quantity'); q.value = 'attn';"
                 "q.dispatchEvent(new Event('change')); })()")
    assert not browser.eval("document.getElementById('head-controls').hidden")
    browser.click("#text .ch:nth-of-type(20)")
    active = browser.eval("[...document.querySelectorAll('#text .ch')]"
                          ".findIndex(s => s.classList.contains('active'))")
    colours = browser.eval(COLOURS)
    neutral = "rgb(242, 242, 242)"
    window = 16  # the tiny run's context
    assert all(c == neutral for c in colours[active + 1 :])  # causal: later ones are unseen
    assert all(c != neutral for c in colours[max(0, active - window + 1) : active + 1])
    assert "head 1" in browser.eval("document.getElementById('heads').textContent")
    browser.screenshot(tmp_path / "transformer.png")
    assert browser.problems(page.resolve().as_uri()) == []


def test_hostile_text_stays_text_in_a_real_browser(tmp_path, browser):
    from charlm.inspect import inspect_run

    ckpt = make_run(tmp_path, "gru", extra=HOSTILE)
    page = inspect_run(ckpt, prime=HOSTILE, out=tmp_path / "hostile.html").path
    browser.open(page)
    assert browser.eval("document.title") == "charlm inspect: run"
    assert browser.eval("window.pwned === undefined")
    assert browser.eval("document.querySelectorAll('img, iframe, #text script').length") == 0
    shown = browser.eval("Array.from(document.querySelectorAll('#text .ch'), "
                         "s => s.textContent).join('')")
    assert shown == "".join(marker(c) for c in HOSTILE)
    assert browser.problems(page.resolve().as_uri()) == []
