"""Fixtures for the browser tests: Playwright (pytest-playwright) on the system Chromium, a real ComfyUI
with the pack, the stand-in behind it.

The fixture API, for tests in this folder:

- ``comfy_page`` (per test): a :class:`tests.browser.comfy_page.ComfyPage` already opened on
  ``ui_server``, in a fresh browser context (its own localStorage). Helpers: ``load_workflow``,
  ``load_template``, ``drop_workflow_file``, ``click_run``, ``structure_node`` (the node's cost texts
  and badges), ``rendered_texts_of_node`` (Nodes 2.0), ``set_setting``, ``add_node``, ``log`` (console,
  uncaught errors, responses). Tests use ``run_from_ui`` in test_web_ui.py to click Run and wait.
- ``ui_server`` (per module): ComfyUI with the pack, pointed at ``ui_standin`` with the test key, a
  returning user's settings (``USER_SETTINGS``), and the example image uploaded.
- ``ui_standin`` (per module): the stand-in service (``structure_api.standin.StandInServer``).
- ``comfy_page_factory`` (per test): ``open(env={...}, settings={...}) -> ComfyPage`` starts another
  ComfyUI for this test (for another environment: no key, offline, ...) and opens a page on it; the
  page's ``server`` is that ComfyUI (``comfy_page.server`` is ``ui_server``).
- ``ui_target`` (per session, parametrized): which ComfyUI and frontend of the matrix this run uses
  (tests/comfy/matrix.py); its id is in every test id, e.g. ``[comfyui-0.3.75+frontend-1.58.1]``.

Pictures: screenshots of every run go to ``.cache/browser-screenshots/<target>/`` (git-ignored), or
``$BROWSER_SCREENSHOT_DIR``. With ``UPDATE_SCREENSHOTS=1`` the run also rewrites the pictures the
repository keeps, from the README's target only: ``docs/screenshots/*.png`` and
``example_workflows/<name>.jpg`` (the template browser's thumbnails).

The frontend sweep (``COMFY_FRONTEND_SWEEP=1``, tests/browser/test_frontend_sweep.py) runs only its smoke
test, over ``matrix.sweep_targets()``; its results table is printed at the end, written to
``.cache/frontend-sweep.md`` and, with ``UPDATE_README=1``, put into README.md's Compatibility section.

On failure a test keeps a screenshot and the browser's console in ``.cache/browser-failures/`` (printed
in the failure report). Without a Chromium these tests skip, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page

from structure_api.standin import StandInServer
from support import TEST_KEY
from tests.browser.comfy_page import DEPRECATION_PROBE_SCRIPT, RETURNING_USER_SCRIPT, BrowserLog, ComfyPage
from tests.comfy import matrix
from tests.comfy.harness import ComfyServer
from tests.comfy.matrix import README_TARGET, ComfyTarget

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_IMAGE = REPO / "example_workflows" / "structure_example.png"
VIEWPORT = (1280, 800)
FAILURE_DIR = REPO / ".cache" / "browser-failures"

# The flags that work here (2 cores, no GPU, no network but loopback): no sandbox (root in a container),
# no GPU process, nothing that phones home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
]

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


def find_chromium() -> str | None:
    """The system Chromium: $CHROMIUM_BIN if set, else Debian's `chromium` on PATH."""
    configured = os.environ.get("CHROMIUM_BIN")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session", params=matrix.selected_ui_targets(), ids=lambda target: target.id)
def ui_target(request: pytest.FixtureRequest) -> ComfyTarget:
    """The ComfyUI and frontend of the matrix these browser tests run against (one at a time)."""
    target: ComfyTarget = request.param
    install = target.install()
    if target.frontend == "pinned" and install.frontend_version != target.pinned_label:
        pytest.fail(
            f"{target.id}: ComfyUI {install.version} pins frontend {install.frontend_version}, "
            f"not {target.pinned_label}: update tests/comfy/matrix.py",
            pytrace=False,
        )
    matrix.record(target.id, install.version, target.frontend_version())
    return target


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """pytest-playwright's launch options: the system Chromium (never a downloaded browser), headless."""
    binary = find_chromium()
    if not binary:
        message = "no Chromium found (install Debian's `chromium`, or set CHROMIUM_BIN)"
        if os.environ.get("CI"):
            pytest.fail(message + ": .ci/run should have installed it", pytrace=False)
        pytest.skip(message)
    return {**browser_type_launch_args, "executable_path": binary, "headless": True, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict) -> dict:
    return {**browser_context_args, "viewport": {"width": VIEWPORT[0], "height": VIEWPORT[1]}}


@pytest.fixture(scope="session")
def screenshot_dir(ui_target: ComfyTarget) -> Path:
    base = Path(os.environ.get("BROWSER_SCREENSHOT_DIR") or REPO / ".cache" / "browser-screenshots")
    path = base / ui_target.id
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def update_pictures(ui_target: ComfyTarget) -> bool:
    """Whether this run rewrites docs/screenshots/ and the template thumbnails (the README's target only)."""
    return os.environ.get("UPDATE_SCREENSHOTS") == "1" and ui_target.id == README_TARGET


@pytest.fixture(scope="module")
def ui_standin() -> Iterator[StandInServer]:
    with StandInServer(api_key=TEST_KEY) as server:
        yield server


def set_setting(server: ComfyServer, setting: str, value: object) -> None:
    """POST /settings/{id}, as the frontend's settings dialog does."""
    response = requests.post(
        f"{server.url}/settings/{setting}", json=value, timeout=(5, 30), proxies={"http": None, "https": None}
    )
    response.raise_for_status()


def start_ui_server(
    target: ComfyTarget, base_dir: Path, env: dict[str, str | None], settings: dict[str, object] | None = None
) -> ComfyServer:
    """A started ComfyUI of this target, with the example image uploaded and a returning user's settings."""
    server = ComfyServer(target.install(), env=env, base_dir=base_dir, extra_args=target.server_args())
    server.start()
    try:
        server.upload_image(EXAMPLE_IMAGE, EXAMPLE_IMAGE.name)
        for setting, value in {**USER_SETTINGS, **(settings or {})}.items():
            set_setting(server, setting, value)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def ui_server(ui_target: ComfyTarget, ui_standin, tmp_path_factory) -> Iterator[ComfyServer]:
    env = {
        "AITHRIVING_BASE_URL": ui_standin.url,
        "AITHRIVING_API_KEY": TEST_KEY,
        "AITHRIVING_CACHE_DIR": str(tmp_path_factory.mktemp("ui-structure-cache")),
    }
    server = start_ui_server(ui_target, tmp_path_factory.mktemp("comfy-ui-base"), env)
    try:
        yield server
    finally:
        server.stop()


def _new_comfy_page(
    browser: Browser, browser_context_args: dict, server: ComfyServer, pages: list[ComfyPage]
) -> ComfyPage:
    context = browser.new_context(**browser_context_args)
    context.add_init_script(RETURNING_USER_SCRIPT)
    context.add_init_script(DEPRECATION_PROBE_SCRIPT)
    page: Page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # a "Leave site?" or alert never blocks a test
    log = BrowserLog()
    log.attach(page)
    comfy = ComfyPage(page, server.url, log, server=server)
    pages.append(comfy)
    return comfy


@pytest.fixture
def _comfy_pages() -> Iterator[list[ComfyPage]]:
    """Every page this test opened (the failure report and the frontend check read it from funcargs)."""
    pages: list[ComfyPage] = []
    yield pages
    for comfy in pages:
        comfy.page.context.close()


@pytest.fixture
def comfy_page(
    browser: Browser, browser_context_args: dict, ui_server: ComfyServer, _comfy_pages: list[ComfyPage]
) -> ComfyPage:
    """A fresh browser context with ComfyUI (ui_server) open and the pack loaded."""
    return _new_comfy_page(browser, browser_context_args, ui_server, _comfy_pages).open()


@pytest.fixture(autouse=True)
def _frontend_is_the_targets(request: pytest.FixtureRequest, ui_target: ComfyTarget) -> None:
    """Every page a test opened ran the frontend its matrix entry names (checked after the test)."""
    yield
    for comfy in request.node.funcargs.get("_comfy_pages") or []:
        if comfy.page.is_closed() or not comfy.page.url.startswith("http"):
            continue
        served = comfy.frontend_version()
        assert served == ui_target.frontend_version(), f"{ui_target.id} served frontend {served}"


@pytest.fixture
def comfy_page_factory(
    browser: Browser,
    browser_context_args: dict,
    ui_target: ComfyTarget,
    tmp_path_factory: pytest.TempPathFactory,
    _comfy_pages: list[ComfyPage],
) -> Iterator[Callable[..., ComfyPage]]:
    """``open(env=None, settings=None) -> ComfyPage``: another ComfyUI (stopped after the test) and a page on
    it.

    The page's ``server`` is that ComfyUI (its log, base directory, HTTP).

    env is the server's environment on top of a clean one (no AITHRIVING_* variable is inherited);
    settings are user settings on top of USER_SETTINGS.
    """
    servers: list[ComfyServer] = []

    def open_page(
        env: dict[str, str | None] | None = None, settings: dict[str, object] | None = None
    ) -> ComfyPage:
        server = start_ui_server(
            ui_target, tmp_path_factory.mktemp("comfy-ui-extra"), dict(env or {}), settings
        )
        servers.append(server)
        return _new_comfy_page(browser, browser_context_args, server, _comfy_pages).open()

    yield open_page
    for server in servers:
        server.stop()


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "frontend_min(version): needs a frontend at least this new "
        "(deselected on older entries of the matrix)",
    )


SWEEP_MODULE = "test_frontend_sweep.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A feature the older frontend of the matrix does not have (Nodes 2.0 before 1.27) is deselected
    # there (reported as deselected, never as passed); "newest" has everything.
    # The frontend sweep's tests run only in the sweep, and the sweep runs nothing else of tests/browser.
    here = Path(__file__).resolve().parent
    keep, drop = [], []
    for item in items:
        in_browser = here in Path(item.path).resolve().parents
        if in_browser and (Path(item.path).name == SWEEP_MODULE) != matrix.sweep_enabled():
            drop.append(item)
            continue
        marker = item.get_closest_marker("frontend_min")
        target = getattr(item, "callspec", None) and item.callspec.params.get("ui_target")
        if marker and isinstance(target, ComfyTarget) and target.frontend != "newest":
            served = target.pinned_label if target.frontend == "pinned" else target.frontend
            if _version_tuple(served) < _version_tuple(marker.args[0]):
                drop.append(item)
                _record_sweep(item, "n/a")
                continue
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed browser test keeps a screenshot and the page's console, and says where."""
    report = yield
    if report.when not in ("setup", "call") or not report.failed:
        return report
    pages: list[ComfyPage] = getattr(item, "funcargs", {}).get("_comfy_pages") or []
    if not pages:
        return report
    folder = FAILURE_DIR / re.sub(r"[^\w.+-]+", "_", item.name)
    folder.mkdir(parents=True, exist_ok=True)
    for number, comfy in enumerate(pages):
        stem = f"page{number}"
        try:
            shot = comfy.screenshot(folder / f"{stem}.png")
            report.sections.append((f"browser screenshot ({stem})", str(shot)))
        except Exception as error:  # the browser may be what failed
            report.sections.append((f"browser screenshot ({stem})", f"none: {error}"))
        log_file = folder / f"{stem}-console.log"
        log_file.write_text(comfy.log.text())
        tail = "\n".join((comfy.log.console + comfy.log.exceptions)[-40:]) or "(empty)"
        report.sections.append((f"browser console ({stem}, last 40; all in {log_file})", tail))
    return report


# -- the frontend sweep's results table -------------------------------------------------------------

SWEEP_TABLE = REPO / ".cache" / "frontend-sweep.md"
README_MARKERS = ("<!-- frontend-sweep:begin -->", "<!-- frontend-sweep:end -->")
# (target id, test name) -> "pass", "FAIL" or "n/a"; filled only in the sweep.
_SWEEP_RESULTS: dict[tuple[str, str], str] = {}
_SWEEP_TARGETS: dict[str, ComfyTarget] = {}
_SWEEP_ITEMS: dict[str, tuple[str, str]] = {}  # test node id -> (target id, test name)


def _record_sweep(item: pytest.Item, outcome: str) -> None:
    target = getattr(item, "callspec", None) and item.callspec.params.get("ui_target")
    if matrix.sweep_enabled() and Path(item.path).name == SWEEP_MODULE and isinstance(target, ComfyTarget):
        _SWEEP_TARGETS[target.id] = target
        name = item.originalname or item.name
        _SWEEP_ITEMS[item.nodeid] = (target.id, name)
        if _SWEEP_RESULTS.get((target.id, name)) != "FAIL":
            _SWEEP_RESULTS[(target.id, name)] = outcome


def pytest_itemcollected(item: pytest.Item) -> None:
    _record_sweep(item, "not run")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    key = _SWEEP_ITEMS.get(report.nodeid)
    if key is None:
        return
    if report.failed:
        _SWEEP_RESULTS[key] = "FAIL"
    elif report.when == "call" and report.passed and _SWEEP_RESULTS[key] != "FAIL":
        _SWEEP_RESULTS[key] = "pass"
    elif report.skipped and _SWEEP_RESULTS[key] != "FAIL":
        _SWEEP_RESULTS[key] = "skipped"


def sweep_table() -> str:
    """The sweep's results as a Markdown table: one row per frontend, one column per step."""
    from tests.browser.test_frontend_sweep import STEPS

    def order(target_id: str) -> tuple[int, ...]:
        return matrix.version_tuple(_SWEEP_TARGETS[target_id].frontend_version())

    lines = [
        "| Frontend | ComfyUI | " + " | ".join(STEPS.values()) + " |",
        "| --- | --- | " + " | ".join("---" for _ in STEPS) + " |",
    ]
    for target_id in sorted(_SWEEP_TARGETS, key=order):
        target = _SWEEP_TARGETS[target_id]
        cells = [_SWEEP_RESULTS.get((target_id, step), "not run") for step in STEPS]
        lines.append(f"| {target.frontend_version()} | {target.comfyui} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not matrix.sweep_enabled() or not _SWEEP_TARGETS:
        return
    table = sweep_table()
    SWEEP_TABLE.parent.mkdir(parents=True, exist_ok=True)
    SWEEP_TABLE.write_text(table)
    terminalreporter.write_sep("=", f"frontend sweep (also in {SWEEP_TABLE})")
    terminalreporter.write(table)
    if os.environ.get("UPDATE_README") == "1":
        readme = REPO / "README.md"
        text = readme.read_text()
        begin, end = (text.index(marker) for marker in README_MARKERS)
        readme.write_text(text[: begin + len(README_MARKERS[0])] + "\n" + table + text[end:])
        terminalreporter.write_line("README.md's sweep table rewritten")
