"""Fixtures for the browser tests: the local stand-in, a real ComfyUI with the pack, headless Chromium on its UI.

Screenshots of every run go to ``.cache/browser-screenshots/`` (git-ignored), or to
``$BROWSER_SCREENSHOT_DIR``. With ``UPDATE_SCREENSHOTS=1`` the run also rewrites the pictures the
repository keeps: ``docs/screenshots/*.png`` (the README's) and ``example_workflows/<name>.jpg``
(the template browser's thumbnails).

Without a Chromium these tests skip, except in CI (``CI`` set), where they fail: `.ci/run` installs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from structure_api.standin import StandInServer
from support import TEST_KEY
from tests.browser.cdp import Chromium, find_chromium
from tests.browser.comfy_page import RETURNING_USER_SCRIPT, ComfyPage
from tests.comfy.harness import DEFAULT_CACHE_DIR, ComfyInstall, ComfyServer, ensure_comfyui

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_IMAGE = REPO / "example_workflows" / "structure_example.png"
VIEWPORT = (1280, 800)

# Server-side settings of a user who has used ComfyUI before: no first-visit template dialog, English,
# no minimap or frame-rate corner over the graph, and node text drawn at every zoom (the screenshots
# show whole graphs).
USER_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Locale": "en",
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Graph.CanvasInfo": False,  # the frame-rate corner
    # Reloading the page with a modified workflow would otherwise stop at a "Leave site?" prompt.
    "Comfy.Window.UnloadConfirmation": False,
}


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    binary = find_chromium()
    if binary:
        return binary
    message = "no Chromium found (install Debian's `chromium`, or set CHROMIUM_BIN)"
    if os.environ.get("CI"):
        pytest.fail(message + ": .ci/run should have installed it", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    path = Path(os.environ.get("BROWSER_SCREENSHOT_DIR") or REPO / ".cache" / "browser-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def update_pictures() -> bool:
    """Whether this run rewrites docs/screenshots/ and the template thumbnails."""
    return os.environ.get("UPDATE_SCREENSHOTS") == "1"


@pytest.fixture(scope="session")
def comfy_install() -> ComfyInstall:
    """ComfyUI 0.3.75 and its venv (tests/comfy/harness.py), built once in .cache/comfyui."""
    return ensure_comfyui(Path(os.environ.get("COMFY_HARNESS_CACHE_DIR") or DEFAULT_CACHE_DIR))


@pytest.fixture(scope="module")
def ui_standin() -> Iterator[StandInServer]:
    with StandInServer(api_key=TEST_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def ui_server(comfy_install, ui_standin, tmp_path_factory) -> Iterator[ComfyServer]:
    env = {"AITHRIVING_BASE_URL": ui_standin.url, "AITHRIVING_API_KEY": TEST_KEY,
           "AITHRIVING_CACHE_DIR": str(tmp_path_factory.mktemp("ui-structure-cache"))}
    server = ComfyServer(comfy_install, env=env, base_dir=tmp_path_factory.mktemp("comfy-ui-base"))
    with server:
        server.upload_image(EXAMPLE_IMAGE, EXAMPLE_IMAGE.name)
        for setting, value in USER_SETTINGS.items():
            set_setting(server, setting, value)
        yield server


def set_setting(server: ComfyServer, setting: str, value: object) -> None:
    """POST /settings/{id}, as the frontend's settings dialog does."""
    response = requests.post(f"{server.url}/settings/{setting}", json=value, timeout=(5, 30),
                             proxies={"http": None, "https": None})
    response.raise_for_status()


@pytest.fixture(scope="module")
def browser(chromium_binary: str) -> Iterator[Chromium]:
    with Chromium(chromium_binary) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def ui(browser: Chromium, ui_server: ComfyServer) -> ComfyPage:
    page = browser.new_page(*VIEWPORT)
    page.add_init_script(RETURNING_USER_SCRIPT)
    return ComfyPage(page, ui_server.url)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed browser test keeps a screenshot and the page's console in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    comfy_page = item.funcargs.get("ui")
    if not isinstance(comfy_page, ComfyPage):
        return
    shots = item.funcargs.get("screenshot_dir") or REPO / ".cache" / "browser-screenshots"
    try:
        path = comfy_page.screenshot(Path(shots) / f"FAILED-{item.name}.png")
        report.sections.append(("browser screenshot", str(path)))
    except Exception as error:  # the browser may be what failed
        report.sections.append(("browser screenshot", f"none: {error}"))
    page = comfy_page.page
    report.sections.append(("browser console (last 40)", "\n".join(page.console[-40:]) or "(empty)"))
    if page.exceptions:
        report.sections.append(("browser exceptions", "\n".join(page.exceptions[-10:])))
