"""Fixtures of the reliability suite and the report hook.

The report (docs/reliability.md) is written at the end of the session only when the environment
variable RELIABILITY_REPORT names the file, so ordinary CI runs never change the tree::

    RELIABILITY_REPORT=docs/reliability.md python -m pytest tests/reliability -q
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from support import RecordingSleep, client_factory

from .probes import CANARY_KEY, photo_like
from .report import REPORT_ENV, Ledger, _Recorder, render

_HERE = Path(__file__).resolve().parent
_REPO_ROOT = _HERE.parents[1]
_LEDGER = pytest.StashKey[Ledger]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LEDGER] = Ledger()
    # The ComfyUI test uses the harness of tests/comfy, imported as tests.comfy.harness.
    if str(_REPO_ROOT) not in sys.path:
        sys.path.append(str(_REPO_ROOT))
    config.addinivalue_line("markers", "comfyui: runs a real ComfyUI server (tests/comfy harness)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    # The hook sees the whole session's tests; only this folder's go into the report.
    if _HERE in Path(item.path).resolve().parents:
        outcome = (
            "xfailed" if report.skipped and getattr(report, "wasxfail", None) is not None else report.outcome
        )
        item.config.stash[_LEDGER].note_outcome(item.nodeid, report.when, outcome, report.duration)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(REPORT_ENV, "").strip()
    ledger = session.config.stash.get(_LEDGER, None)
    if not target or ledger is None or not ledger.outcomes:
        return
    path = Path(target)
    if not path.is_absolute():
        path = Path(session.config.rootpath) / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(ledger), encoding="utf-8")
    session.config.get_terminal_writer().line(f"reliability report written to {path}")


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> _Recorder:
    """Where a test writes the scenarios it asserted, for docs/reliability.md."""
    return _Recorder(request.config.stash[_LEDGER], request.node.nodeid)


@pytest.fixture(scope="module")
def module_ledger(request: pytest.FixtureRequest):
    """``module_ledger(test_name)``: a recorder for rows written on behalf of a test of this module."""
    ledger = request.config.stash[_LEDGER]
    return lambda test_name: _Recorder(ledger, f"{request.node.nodeid}::{test_name}")


# The clean environment (no proxy, key, key file, base URL or cache of the machine) comes from
# tests/conftest.py's autouse fixture, which covers this folder too.


@pytest.fixture
def service():
    """A stand-in on 127.0.0.1 that requires the canary key."""
    from structure_api.standin import StandInServer

    with StandInServer(api_key=CANARY_KEY) as server:
        yield server


@pytest.fixture
def waits() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def new_client(service, waits):
    """Factory of clients of the stand-in: canary key, recorded (never slept) waits, zero jitter."""
    with client_factory(CANARY_KEY, service.url, waits) as factory:
        yield factory


@pytest.fixture(scope="session")
def small_upload():
    """A 96x64 PNG upload."""
    from structure_api.images import encode_upload

    return encode_upload(photo_like(96, 64))
