"""The clinician's page on the box (issue 16 item 5): photograph in, diagnosis and reliability out.

The page is static and locked down (CSP, no external URL, no data in it); every value comes from
the token-protected API. In headless Chromium, driven over the DevTools protocol: the clinician
types the token, picks a real ISIC image in the file input, reads back the diagnosis, the
reliability %, the model version and the time, sees the study in the recent list, and corrects
the finding, which the box records as a training label. The screenshot goes to the test's tmp
folder, not the repository. Skips with the reason when chromium is missing.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.test_api_helpers import TOKEN, running_box

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ISIC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isic-uda1" / "ISIC_0000000.jpg"


def test_page_is_static_locked_down_and_the_data_needs_the_token(tmp_path: Path) -> None:
    with running_box(tmp_path) as box:
        client = TestClient(box.app)
        page = client.get("/clinic")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sorted(assets) == ["/clinic/static/app.js", "/clinic/static/style.css"]
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and r.text
            assert re.findall(r"https?://", r.text) == []  # no CDN: the box may have no internet
        assert ".innerHTML" not in client.get("/clinic/static/app.js").text  # text only, never markup from data
        assert client.get("/clinic/static/__init__.py").status_code == 404
        # the page itself holds nothing; what it shows needs the clinician's token
        assert client.get("/v1/studies").status_code == 401
        assert client.get("/v1/model").status_code == 401
        assert client.get("/v1/model", headers=box.auth).status_code == 200


class DevTools:
    """A minimal Chrome DevTools Protocol client over the page target's WebSocket."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 1024 * 1024)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    def js(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    def until(self, expr: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expr}")


@contextmanager
def chromium(tmp: Path) -> Iterator[DevTools]:
    assert CHROMIUM is not None
    profile = tmp / "chromium-profile"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1200,900",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None, "chromium did not start"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        try:
            yield tools
        finally:
            tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_clinician_uploads_an_image_and_corrects_the_finding_in_chromium(tmp_path: Path) -> None:
    image = tmp_path / "lesion.jpg"
    if ISIC.exists():
        shutil.copy(ISIC, image)  # a real ISIC dermoscopy image
    else:  # without the shared data, a plain RGB JPEG (the page and the API are what is tested)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(image)
    with running_box(tmp_path / "box") as box, chromium(tmp_path) as cdp:
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=box.url + "/clinic")
        cdp.until("document.body && document.body.dataset.loaded === '1'")
        assert "enter a valid API token" in cdp.js("document.getElementById('model').textContent")
        cdp.js(f"const t = document.getElementById('token'); t.value = {json.dumps(TOKEN)};"
               "t.dispatchEvent(new Event('change'));")
        assert cdp.until("document.body.dataset.model") == "v1"
        doc = cdp.call("DOM.getDocument")
        node = cdp.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")["nodeId"]
        cdp.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
        state = cdp.until("['done', 'error'].includes(document.getElementById('result').dataset.state) && "
                          "document.getElementById('result').dataset.state")
        text = {k: cdp.js(f"document.getElementById('{k}').textContent")
                for k in ("status", "label", "probability", "reliability", "version", "time")}
        assert state == "done", text
        assert text["label"] in ("normal", "pneumonia") and text["version"] == "v1"
        assert re.fullmatch(r"\d{1,3}\.\d %", text["reliability"]), text
        assert re.fullmatch(r"\d{1,3}\.\d %", text["probability"]), text
        assert re.fullmatch(r"\d+ ms on the box, \d+ ms here", text["time"]), text
        # the API's own record of the same study agrees with what the page shows
        (study,) = httpx.get(box.url + "/v1/studies", headers=box.auth).json()
        assert study["label"] == text["label"]
        assert f"{100 * study['confidence']:.1f} %" == text["reliability"]
        assert cdp.until("document.body.dataset.studies") == "1"
        other = "normal" if text["label"] == "pneumonia" else "pneumonia"
        cdp.js(f"document.getElementById('correct').value = '{other}';"
               "document.getElementById('save-correction').click();")
        assert cdp.until("document.getElementById('result').dataset.finding") == other
        assert httpx.get(box.url + f"/v1/studies/{study['study_id']}", headers=box.auth).json()["finding"] == other
        shot = cdp.call("Page.captureScreenshot", format="png")["data"]
        import base64

        png = base64.b64decode(shot)
        (tmp_path / "clinic.png").write_bytes(png)  # the test's output folder, not the repository
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
