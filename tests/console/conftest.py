"""The console in a real browser: Debian's Chromium driven by Playwright, against a real
`pipeline-console serve` process on 127.0.0.1 and a real database (SQLite and PostgreSQL).

Chromium comes from the `chromium` Debian package (.ci/run installs it); Playwright never
downloads a browser. Without it the browser tests are skipped locally, and FAIL under CI=true.
Screenshots go to $PIPELINE_CONSOLE_SCREENSHOTS (default: test-artifacts/screenshots); the
tests print the folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI, TEST_SECRET_KEY, make_token

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
SCREENSHOTS = Path(os.environ.get("PIPELINE_CONSOLE_SCREENSHOTS",
                                  Path(__file__).resolve().parents[2] / "test-artifacts"
                                  / "screenshots"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def console_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real server process on the test's database, with the tests' secret key (it refuses
    to start while the database holds secrets its key cannot read: the demo's systems')."""
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline_console.cli", "serve", "--port", str(port)],
        env={**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": database_url,
             "PIPELINE_CONSOLE_SECRET_KEY": TEST_SECRET_KEY,
             "PIPELINE_CONSOLE_CONSOLE_REFRESH_S": "2"},
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)"
        if IN_CI:
            pytest.fail(message + " (CI=true: the browser tests must not be skipped)")
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture
async def operator_token(database) -> str:
    return await make_token(database, "operator", name="night-operator")


@pytest.fixture
async def page(chromium_path: str, console_url: str,
               operator_token: str) -> AsyncIterator[object]:
    """A browser tab signed in to the console as an operator, through the sign-in form."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path,
                                                   headless=True, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1280, "height": 900},
                                            base_url=console_url)
        context.set_default_timeout(15_000)
        tab = await context.new_page()
        await tab.goto("/login")
        await tab.fill("#token", operator_token)
        await tab.click("#login button")
        await tab.wait_for_url(f"{console_url}/")
        try:
            yield tab
        finally:
            await context.close()
            await browser.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {SCREENSHOTS}")
    return SCREENSHOTS
