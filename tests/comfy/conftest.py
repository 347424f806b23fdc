"""Fixtures that run a real ComfyUI: the install (once per session) and servers started on demand.

Everything under tests/comfy carries the `comfyui` marker (deselect with `-m "not comfyui"`).
A failed set-up is a test error, never a skip: CI must go red when ComfyUI cannot be had.

tests/comfy/__init__.py exists so that pytest imports this file as a package module: without it,
this conftest would take the module name `conftest` that tests at the top of tests/ import from.
Import the harness as `tests.comfy.harness` everywhere (one copy of its exception classes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.comfy import matrix
from tests.comfy.harness import ComfyInstall, ComfyServer

_HERE = Path(__file__).resolve().parent
# First use builds a venv (about a minute here, more on a slow network); the project-wide timeout
# is meant for single tests, and pytest-timeout counts fixture set-up in the first test that needs it.
_COMFY_TEST_TIMEOUT = 900
_LOG_TAIL_CHARS = 20_000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "comfyui: runs a real ComfyUI server (tests/comfy)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this folder's.
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(_COMFY_TEST_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # A failed test's report carries the tail of every ComfyUI log it used: the server's side of it.
    report = yield
    if report.failed and report.when in ("setup", "call"):
        funcargs = getattr(item, "funcargs", {})
        servers = list(funcargs.get("comfy_servers") or [])
        session_server = funcargs.get("comfy_server")
        if isinstance(session_server, ComfyServer):
            servers.append(session_server)
        for server in servers:
            report.sections.append(
                (f"ComfyUI log {server.log_path} (tail)", server.log_text()[-_LOG_TAIL_CHARS:])
            )
    return report


@pytest.fixture(
    scope="session", params=matrix.selected_server_versions(), ids=lambda version: f"comfyui-{version}"
)
def comfy_install(request: pytest.FixtureRequest) -> ComfyInstall:
    """Each ComfyUI of the matrix in turn (tests/comfy/matrix.py): 0.3.75, then 0.3.52, built once and reused.

    0.3.75 and the venv live in .cache/comfyui (or $COMFY_HARNESS_CACHE_DIR), 0.3.52 beside it.
    """
    install = matrix.install_of(request.param)
    matrix.record(f"comfyui-{install.version}", install.version)
    return install


@pytest.fixture
def comfy_servers() -> list[ComfyServer]:
    """The ComfyUI servers this test started with comfy_server_factory, in the order it started them."""
    return []


@pytest.fixture
def comfy_server_factory(
    comfy_install: ComfyInstall, tmp_path_factory: pytest.TempPathFactory, comfy_servers: list[ComfyServer]
) -> Iterator[Callable[..., ComfyServer]]:
    """Start ComfyUI servers for one test: ``start(env={...}, **ComfyServer kwargs) -> ComfyServer``.

    Each gets a fresh base directory under the test's tmp folder and the pack linked in; all are
    stopped after the test; a failed test's report shows the tail of each one's log (``comfy_servers``
    lists them).
    """
    servers = comfy_servers

    def start(env: dict[str, str | None] | None = None, **kwargs) -> ComfyServer:
        kwargs.setdefault("base_dir", tmp_path_factory.mktemp("comfy-base"))
        server = ComfyServer(comfy_install, env=env, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(
    comfy_install: ComfyInstall, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComfyServer]:
    """One ComfyUI server for the whole session, with no extra environment. Do not stop it."""
    server = ComfyServer(comfy_install, base_dir=tmp_path_factory.mktemp("comfy-session-base"))
    with server:
        yield server
