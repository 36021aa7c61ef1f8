"""End to end in headless Chromium: the playground page edits the bundled model, then undoes the edit.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``scripts/ci_browser_setup.sh``) and the pip
package ``selenium``; skips with the reason when any is missing. Set ``LMEDIT_UPDATE_SCREENSHOTS=1`` to write
the before/after screenshots to docs/img/ (they are always written to the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="headless browser test needs Debian chromium + chromium-driver: run scripts/ci_browser_setup.sh",
    ),
]

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="browser test needs selenium (pip install selenium)"
)
pytest.importorskip("fastapi", reason="lmedit serve needs fastapi (pip install fastapi uvicorn)")
uvicorn = pytest.importorskip("uvicorn", reason="lmedit serve needs uvicorn (pip install fastapi uvicorn)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lmedit.serve import ServerState, create_app  # noqa: E402

EDIT_TIMEOUT_S = 900


class LiveServer:
    """uvicorn serving ``app`` in a thread on 127.0.0.1 (port chosen by the OS)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1700",
    ):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def _generate(driver, count: int) -> str:
    driver.find_element(By.ID, "gen-button").click()
    WebDriverWait(driver, 120).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-generated") == str(count)
    )
    return driver.find_element(By.ID, "gen-output").get_attribute("textContent")


def _save(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, height + 160)  # the whole page, not only the first screenful
    driver.save_screenshot(str(path))
    if os.environ.get("LMEDIT_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMG / name)


def info_trace(driver) -> bool:
    """Whether the page shows the causal-tracing panel (``lmedit.locate`` present)."""
    return driver.find_element(By.ID, "trace-ui").is_displayed()


def test_page_edits_bundled_model_and_undo_restores(gemma, browser, tmp_path):
    state = ServerState(gemma)
    srv = LiveServer(create_app(state))
    try:
        browser.get(srv.url)
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        )
        assert "gemma3-270m" in _text(browser, "#model-info")
        methods = [
            o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#edit-method option")
        ]
        assert "ft-m" in methods and "ft-l" in methods
        assert browser.find_element(By.ID, "hp-lr").get_attribute("value") == "0.0005"

        before = _generate(browser, 1)
        assert "Paris" in before, before
        assert len(browser.find_elements(By.CSS_SELECTOR, "#gen-top tbody tr")) == 5
        _save(browser, tmp_path, "playground-before.png")

        browser.find_element(By.ID, "edit-apply").click()
        WebDriverWait(browser, EDIT_TIMEOUT_S).until(
            lambda d: (
                "ok" in d.find_element(By.ID, "edit-status").get_attribute("class").split()
                or "err" in d.find_element(By.ID, "edit-status").get_attribute("class").split()
            )
        )
        status = _text(browser, "#edit-status")
        assert status.startswith("applied as edit #1"), status
        row = browser.find_element(By.CSS_SELECTOR, '#compare-table tr[data-kind="edit"]')
        row_before = row.find_element(By.CSS_SELECTOR, ".out-before").get_attribute("textContent")
        row_after = row.find_element(By.CSS_SELECTOR, ".out-after").get_attribute("textContent")
        assert row_before == before and row_after != before and "Rome" in row_after, (row_before, row_after)
        metrics = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#metric-table tbody tr")]
        assert any(m.startswith("reliability") for m in metrics) and any(
            m.startswith("locality") for m in metrics
        )
        assert browser.find_elements(By.CSS_SELECTOR, '#history-table tr[data-edit="1"]')

        after = _generate(browser, 2)
        assert after == row_after
        _save(browser, tmp_path, "playground-after.png")
        link = browser.find_element(By.CSS_SELECTOR, '#history-table tr[data-edit="1"] a')
        assert link.get_attribute("href").endswith("/api/patches/1")
        patch_zip = tmp_path / "edit-1.zip"
        with urllib.request.urlopen(link.get_attribute("href"), timeout=60) as resp:
            patch_zip.write_bytes(resp.read())

        browser.find_element(By.ID, "undo-1").click()
        WebDriverWait(browser, 300).until(
            lambda d: not d.find_elements(By.CSS_SELECTOR, '#history-table tr[data-edit="1"]')
        )
        assert "ok" in browser.find_element(By.ID, "history-status").get_attribute("class").split()
        restored = _generate(browser, 3)
        assert restored == before
        assert state.history()["edits"] == []

        # upload the downloaded patch through the page: the edit comes back; "Undo all" removes it again
        browser.find_element(By.ID, "upload-file").send_keys(str(patch_zip))
        browser.find_element(By.ID, "upload-button").click()
        WebDriverWait(browser, 300).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '#history-table tr[data-edit="2"]')
        )
        assert "(uploaded)" in _text(browser, '#history-table tr[data-edit="2"]')
        assert _generate(browser, 4) == after
        browser.find_element(By.ID, "reset-button").click()
        WebDriverWait(browser, 300).until(
            lambda d: not d.find_elements(By.CSS_SELECTOR, '#history-table tr[data-edit="2"]')
        )
        assert _generate(browser, 5) == before

        if not info_trace(browser):
            return
        samples = browser.find_element(By.ID, "trace-samples")
        samples.clear()
        samples.send_keys("1")
        browser.find_element(By.ID, "trace-button").click()
        WebDriverWait(browser, 300).until(
            lambda d: (
                d.find_element(By.ID, "trace-status").get_attribute("class").split()[-1] in ("ok", "err")
            )
        )
        assert "ok" in browser.find_element(By.ID, "trace-status").get_attribute("class"), _text(
            browser, "#trace-status"
        )
        rows = browser.find_elements(By.CSS_SELECTOR, "#trace-table tr")
        n_tokens = len(gemma.tokenizer("The Eiffel Tower is located in the city of")["input_ids"])
        assert len(rows) == 1 + n_tokens  # header + one row per token
        assert len(rows[0].find_elements(By.TAG_NAME, "td")) == 1 + 18  # label + one column per layer
        browser.execute_script("document.getElementById('trace-panel').scrollIntoView()")
        _save(browser, tmp_path, "playground-trace.png")
    finally:
        srv.close()
        state.session.reset()
