"""Shared fixtures: a clean environment for every test, and a real stand-in server on loopback."""

from __future__ import annotations

import sys

import pytest

from support import TEST_KEY, RecordingSleep, client_factory

_CLEARED = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "AITHRIVING_API_KEY",
    "AITHRIVING_API_KEY_FILE",
    "AITHRIVING_BASE_URL",
    "AITHRIVING_CACHE_DIR",
    "AITHRIVING_CACHE_MAX_MB",
    "AITHRIVING_MAX_CONCURRENCY",
    "AITHRIVING_RATE_LIMIT",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No proxy, key, key file, base URL or cache of the developer's machine reaches a test."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    # A key file path that does not exist, so ~/.config/aithriving/api_key is never read.
    monkeypatch.setenv("AITHRIVING_API_KEY_FILE", str(home / "no-such-key-file"))
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", "off")
    # No pacing unless a test asks for it (the pacer's own tests set a limit or pass a Pacer);
    # the shared pause after a 429 still applies.
    monkeypatch.setenv("AITHRIVING_RATE_LIMIT", "off")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    # Windows finds the home folder and the config and cache folders through these.
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.setenv("APPDATA", str(home / "AppData" / "Roaming"))
    monkeypatch.setenv("LOCALAPPDATA", str(home / "AppData" / "Local"))
    # The process-wide stores (memory-only ones too) start empty for every test.
    from structure_api.store import _forget_shared_stores

    _forget_shared_stores()


@pytest.fixture
def standin():
    """A stand-in server on 127.0.0.1 that requires TEST_KEY."""
    from structure_api.standin import StandInServer

    with StandInServer(api_key=TEST_KEY) as server:
        yield server


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def make_client(standin, sleeps):
    """Factory for clients of the stand-in with no real sleeping and zero jitter."""
    with client_factory(TEST_KEY, standin.url, sleeps) as factory:
        yield factory


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Name every ComfyUI and frontend this run tested against (tests/comfy/matrix.py), as resolved."""
    import sys

    matrix = sys.modules.get("tests.comfy.matrix")
    if matrix is None or not matrix.RESOLVED:
        return
    terminalreporter.section("ComfyUI matrix (versions resolved in this run)")
    for target_id, versions in sorted(matrix.RESOLVED.items()):
        terminalreporter.write_line(f"{target_id}: {versions}")


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "posix_only(reason): the test checks something only POSIX has (file modes, signals, mounts); on "
        "Windows it is reported as 'POSIX only: <reason>' (the Windows lane lists each), never run.",
    )


def pytest_runtest_setup(item) -> None:
    """Tests marked posix_only do not run on Windows; the skip says so and why, for the lane's summary."""
    for mark in item.iter_markers("posix_only"):
        reason = mark.args[0] if mark.args else mark.kwargs.get("reason", "")
        if not reason:
            raise pytest.UsageError(f"{item.nodeid}: posix_only needs a reason")
        if sys.platform == "win32":
            pytest.skip(f"POSIX only: {reason}")
