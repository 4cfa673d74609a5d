"""Headless Chromium as a reader sees a page, over the DevTools protocol (``--remote-debugging-
pipe``: JSON messages on file descriptors 3 and 4; no extra package, no network).

``Browser().visit(page, width, height, screenshot=png)`` loads ``page`` in a fresh profile at a
phone- or desktop-sized viewport (device metrics emulated, so a 390 px phone width is real),
collects console errors, uncaught exceptions and failed loads, measures what loaded (images,
tables, figures, page width) and saves a PNG screenshot. Used by
``tests/test_audit_report.py`` and ``docs/make_screenshots.py`` (the README images).
Chromium comes from the Debian package ``chromium`` (``$CHROMIUM`` overrides).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-pipe", "about:blank"]

MEASURE = """(() => {
  const imgs = [...document.images];
  return {
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0))
                .map(i => i.getAttribute('src').slice(0, 80)),
    too_wide_images: imgs.filter(i => i.getBoundingClientRect().right > innerWidth + 1).length,
    tables: document.querySelectorAll('table').length,
    figures: document.querySelectorAll('figure img').length,
    captions: document.querySelectorAll('figcaption').length,
    marks: document.querySelectorAll('mark').length,
    viewport: innerWidth,
    page_width: document.documentElement.scrollWidth,
    font_px: parseFloat(getComputedStyle(document.body).fontSize),
    title: document.title};
})()"""


def find_chromium() -> str | None:
    """The Chromium executable (``$CHROMIUM`` or the Debian package), or None."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _high(fd: int) -> int:
    """``fd`` moved to a number >= 10 (close-on-exec), clear of the 3 and 4 the child uses."""
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Browser:
    """One headless Chromium process driven over the DevTools pipe (a context manager)."""

    def __init__(self, exe: str | None = None, timeout: float = 60):
        self.exe = exe or find_chromium()
        if self.exe is None:
            raise RuntimeError("no Chromium found: apt-get install chromium (or set $CHROMIUM)")
        self.timeout, self._id, self._buf, self.events = timeout, 0, b"", []
        self._profile = tempfile.mkdtemp(prefix="skl-chromium-")
        self._log = open(os.path.join(self._profile, "stderr.log"), "wb")  # never a full pipe
        to_child, self._w = map(_high, os.pipe())    # we write commands -> child's fd 3
        self._r, from_child = map(_high, os.pipe())  # child's fd 4 -> we read replies

        # bash maps the pipe ends onto fds 3 and 4 (no preexec_fn: safe in a process that
        # already runs threads, e.g. torch's)
        redirect = (f'exec "$0" "$@" 3<&{to_child} 4>&{from_child} {to_child}<&- '
                    f'{from_child}>&-')
        self.proc = subprocess.Popen([shutil.which("bash") or "/bin/bash", "-c", redirect,
                                      self.exe, *FLAGS[:-1],
                                      f"--user-data-dir={self._profile}", FLAGS[-1]],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log, pass_fds=(to_child, from_child))
        os.close(to_child)
        os.close(from_child)
        os.set_blocking(self._r, True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:  # already gone
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                self._log.flush()
                err = Path(self._log.name).read_text(errors="replace")[-800:]
                raise RuntimeError(f"Chromium closed the DevTools pipe: {err}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Send a DevTools command; return its result (events seen meanwhile are kept)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = self._read()
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(f"no reply to {method} within {self.timeout} s")

    def _wait_event(self, name: str, session: str) -> None:
        if any(e.get("method") == name and e.get("sessionId") == session for e in self.events):
            return
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = self._read()
            self.events.append(m)
            if m.get("method") == name and m.get("sessionId") == session:
                return
        raise TimeoutError(f"{name} did not arrive within {self.timeout} s")

    def visit(self, page: Path | str, width: int, height: int, screenshot: Path | None = None,
              full_page: bool = False, mobile: bool | None = None) -> dict:
        """Load ``page`` at a ``width`` x ``height`` viewport; return the measurements of
        :data:`MEASURE` plus ``errors`` (console errors, exceptions, failed loads)."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        s = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", s)
        mobile = width < 600 if mobile is None else mobile
        self.send("Emulation.setDeviceMetricsOverride", s, width=width, height=height,
                  deviceScaleFactor=1, mobile=mobile)
        self.events = []
        url = Path(page).resolve().as_uri() if not str(page).startswith(("file:", "data:")) \
            else str(page)
        self.send("Page.navigate", s, url=url)
        self._wait_event("Page.loadEventFired", s)
        out = self.send("Runtime.evaluate", s, expression=MEASURE, returnByValue=True)
        out = out["result"]["value"]
        out["errors"] = self._errors(s)
        if screenshot is not None:
            params = {"format": "png"}
            if full_page:
                h = self.send("Runtime.evaluate", s, returnByValue=True,
                              expression="document.documentElement.scrollHeight")
                params.update(captureBeyondViewport=True, clip={
                    "x": 0, "y": 0, "width": width, "height": h["result"]["value"], "scale": 1})
            data = self.send("Page.captureScreenshot", s, **params)["data"]
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            Path(screenshot).write_bytes(base64.b64decode(data))
        self.send("Target.closeTarget", targetId=target)
        return out

    def _errors(self, session: str) -> list[str]:
        errs = []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errs.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                errs.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errs.append("log: " + p["entry"].get("text", "") + " " +
                            p["entry"].get("url", ""))
            elif m == "Network.loadingFailed":
                errs.append("failed load: " + p.get("errorText", ""))
        return errs
