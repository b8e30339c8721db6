"""A headless Chromium driven over the DevTools protocol (aiohttp's websocket client, no other
dependency): open a page, wait for text to appear, click, read the page text, take a screenshot.
Used by ``tests/mlflow_ui_check.py`` to look at the MLflow UI as a user's browser shows it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import aiohttp

__all__ = ["Browser", "chromium_binary"]

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium_binary() -> str | None:
    """The Chromium on PATH (``chromium``, ``chromium-browser``, ``google-chrome``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """``async with Browser() as b: await b.open(url); await b.wait_for_text("Runs")``."""

    def __init__(self, width: int = 1600, height: int = 1000, binary: str | None = None) -> None:
        self.width, self.height = width, height
        self.binary = binary or chromium_binary()
        if self.binary is None:
            raise FileNotFoundError("no chromium on PATH (apt-get install -y chromium)")
        self._id = 0

    async def __aenter__(self) -> Self:
        self._profile = tempfile.mkdtemp(prefix="nfpi-chromium-")  # a fresh profile every time
        self._proc = await asyncio.create_subprocess_exec(
            self.binary,
            *FLAGS,
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "--remote-debugging-port=0",
            "about:blank",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self._proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)  # polled: the file appears once the port is open
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._ws.close()
        await self._session.close()
        self._proc.terminate()
        try:
            await asyncio.wait_for(self._proc.wait(), timeout=30)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One DevTools command; its result (events arriving meanwhile are skipped)."""
        self._id += 1
        await self._ws.send_str(
            json.dumps({"id": self._id, "method": method, "params": params or {}})
        )
        while True:
            msg = json.loads((await self._ws.receive()).data)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        return result.get("result", {}).get("value")

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, expression: str, what: str, timeout: float = 60.0) -> None:
        """Poll ``expression`` (JavaScript) until it is truthy, or fail naming ``what``."""
        deadline = time.monotonic() + timeout
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {what}")
            await asyncio.sleep(0.25)  # polled: the UI renders after its API calls return

    async def wait_for_text(self, text: str, timeout: float = 60.0) -> None:
        await self.wait_for(
            f"document.body && document.body.innerText.includes({json.dumps(text)})",
            repr(text),
            timeout,
        )

    async def click_text(
        self, text: str, selector: str = "a, button, [role=tab], span, div"
    ) -> bool:
        """Click the innermost element matching ``selector`` whose text is exactly ``text``."""
        script = f"""(() => {{
            const els = [...document.querySelectorAll({json.dumps(selector)})]
              .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
            const el = els.find(e => ![...e.children].some(c => els.includes(c))) || els[0];
            if (!el) return false;
            el.scrollIntoView(); el.click(); return true; }})()"""
        return bool(await self.evaluate(script))

    async def screenshot(self, path: str | os.PathLike[str]) -> Path:
        data = await self.send("Page.captureScreenshot", {"format": "png"})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path
