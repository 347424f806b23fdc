"""The ComfyUI versions and frontends the real-ComfyUI and browser tests run against (the CI matrix).

Each entry is a pytest parameter whose id names the server and the frontend, so a failure says which:

==================================  ===========  ==========================================================
id                                  ComfyUI      frontend
==================================  ===========  ==========================================================
comfyui-0.3.75+frontend-1.32.9      0.3.75       the one it pins (requirements.txt)
comfyui-0.33.0+frontend-1.49.6      0.33.0       the one it pins
comfyui-0.33.0+frontend-newest      0.33.0       the newest ``comfyui-frontend-package`` on the index when
                                                 the tests run (``--front-end-root``); hold it back with
                                                 ``NEWEST_FRONTEND_HOLD`` below or ``$COMFY_FRONTEND_NEWEST``
comfyui-0.3.52+frontend-1.25.10     0.3.52       the one it pins (the oldest server on the index)
==================================  ===========  ==========================================================

The node tests (tests/comfy) run on each server (``comfyui-0.3.75``, ``comfyui-0.33.0``,
``comfyui-0.3.52``); the frontend does not take part there. The resolved versions are printed in
the pytest header and in the terminal summary. ``$COMFY_MATRIX`` (comma-separated ids, or parts of
ids) runs a subset locally, e.g. ``COMFY_MATRIX=newest``; unset, everything runs.

The frontend sweep (``COMFY_FRONTEND_SWEEP=1``, off by default; tests/browser/test_frontend_sweep.py)
replaces the browser entries with ``sweep_targets()``: one frontend per ``SWEEP_STEP`` minor versions
from 1.25 to the newest, each served by the server of its time (``sweep_server_for``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

from tests.comfy.harness import (
    COMFYUI_VERSION,
    DEFAULT_CACHE_DIR,
    ComfyInstall,
    ensure_comfyui,
    ensure_frontend,
    frontend_versions,
    newest_frontend_version,
)

OLDEST_COMFYUI = "0.3.52"
NEWEST_COMFYUI = "0.33.0"
# The one place to hold "newest" back (e.g. "1.58.1") if a new frontend release breaks the run for
# reasons outside this pack; None means whatever the index serves.
NEWEST_FRONTEND_HOLD: str | None = None
# The target whose pictures the README shows (UPDATE_SCREENSHOTS=1 writes only these).
README_TARGET = f"comfyui-{COMFYUI_VERSION}+frontend-1.32.9"


def cache_dir() -> Path:
    """Where the harness keeps ComfyUI: $COMFY_HARNESS_CACHE_DIR, else .cache/comfyui."""
    return Path(os.environ.get("COMFY_HARNESS_CACHE_DIR") or DEFAULT_CACHE_DIR)


@functools.cache
def install_of(version: str) -> ComfyInstall:
    """ComfyUI `version` ready to run (built once per process, then reused)."""
    return ensure_comfyui(cache_dir(), version=version)


@functools.cache
def newest_frontend() -> str:
    """The frontend version the "newest" entry serves: the hold if set, else the index's newest."""
    return os.environ.get("COMFY_FRONTEND_NEWEST") or NEWEST_FRONTEND_HOLD or newest_frontend_version()


@dataclasses.dataclass(frozen=True)
class ComfyTarget:
    """One entry of the matrix: a ComfyUI server version and the frontend it serves."""

    comfyui: str
    # "pinned" (what that ComfyUI's requirements.txt pins), "newest", or an exact version.
    frontend: str = "pinned"
    pinned_label: str = ""  # the pinned version, for the id (known without fetching anything)

    @property
    def id(self) -> str:
        label = self.pinned_label if self.frontend == "pinned" else self.frontend
        return f"comfyui-{self.comfyui}+frontend-{label}"

    def install(self) -> ComfyInstall:
        return install_of(self.comfyui)

    def frontend_version(self) -> str:
        """The frontend version this entry really serves (resolves "newest")."""
        if self.frontend == "pinned":
            return self.install().frontend_version
        return newest_frontend() if self.frontend == "newest" else self.frontend

    def server_args(self) -> list[str]:
        """Extra ComfyUI arguments: ``--front-end-root`` for a frontend other than the pinned one."""
        if self.frontend == "pinned":
            return []
        return ["--front-end-root", str(ensure_frontend(self.frontend_version(), cache_dir()))]


ALL_UI_TARGETS = (
    ComfyTarget(COMFYUI_VERSION, "pinned", "1.32.9"),
    ComfyTarget(NEWEST_COMFYUI, "pinned", "1.49.6"),
    ComfyTarget(NEWEST_COMFYUI, "newest"),
    ComfyTarget(OLDEST_COMFYUI, "pinned", "1.25.10"),
)
ALL_SERVER_VERSIONS = (COMFYUI_VERSION, NEWEST_COMFYUI, OLDEST_COMFYUI)
# The entries a plain run (CI) covers: all of them.
UI_TARGETS = ALL_UI_TARGETS
SERVER_VERSIONS = ALL_SERVER_VERSIONS

# What this process resolved, for the report: id -> "ComfyUI X, frontend Y".
RESOLVED: dict[str, str] = {}


def _selected(default: list[str], every: list[str]) -> list[str]:
    wanted = [part.strip() for part in os.environ.get("COMFY_MATRIX", "").split(",") if part.strip()]
    if not wanted:
        return default
    return [i for i in every if any(part in i for part in wanted)]


def selected_ui_targets() -> list[ComfyTarget]:
    if sweep_enabled():
        every = [t.id for t in sweep_targets()]
        chosen = set(_selected(every, every))
        return [t for t in sweep_targets() if t.id in chosen]
    chosen = set(_selected([t.id for t in UI_TARGETS], [t.id for t in ALL_UI_TARGETS]))
    return [t for t in ALL_UI_TARGETS if t.id in chosen]


def selected_server_versions() -> list[str]:
    chosen = set(
        _selected([f"comfyui-{v}" for v in SERVER_VERSIONS], [f"comfyui-{v}" for v in ALL_SERVER_VERSIONS])
    )
    return [v for v in ALL_SERVER_VERSIONS if f"comfyui-{v}" in chosen]


def record(target_id: str, comfyui: str, frontend: str | None = None) -> None:
    RESOLVED[target_id] = f"ComfyUI {comfyui}" + (f", frontend {frontend}" if frontend else "")


# -- the frontend sweep -----------------------------------------------------------------------------

SWEEP_FIRST_MINOR = 25
SWEEP_STEP = 3
# Each server's pinned frontend, oldest first: a swept frontend is served by the newest server whose
# pin is not newer than it (the server a user had while that frontend was current).
PINNED_FRONTENDS = ((OLDEST_COMFYUI, "1.25.10"), (COMFYUI_VERSION, "1.32.9"), (NEWEST_COMFYUI, "1.49.6"))


def sweep_enabled() -> bool:
    """Whether this run is the frontend sweep ($COMFY_FRONTEND_SWEEP=1)."""
    return os.environ.get("COMFY_FRONTEND_SWEEP") == "1"


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def sweep_server_for(frontend: str) -> str:
    """The ComfyUI a swept frontend is served by: the newest one whose pinned frontend is not newer."""
    server = PINNED_FRONTENDS[0][0]
    for comfyui, pinned in PINNED_FRONTENDS:
        if version_tuple(pinned) <= version_tuple(frontend):
            server = comfyui
    return server


def sweep_frontends(available: list[str], newest: str) -> list[str]:
    """One frontend per SWEEP_STEP minor versions from 1.25 to the newest: each minor's last release,
    or the pinned one where a server pins that minor; the pinned frontends and the newest always."""
    releases = [v for v in available if re.fullmatch(r"1\.\d+\.\d+", v)]
    pinned = {version_tuple(p)[:2]: p for _, p in PINNED_FRONTENDS}
    newest_minor = version_tuple(newest)[1]
    minors = set(range(SWEEP_FIRST_MINOR, newest_minor + 1, SWEEP_STEP)) | {newest_minor}
    minors |= {key[1] for key in pinned}
    chosen = []
    for minor in sorted(minors):
        if (1, minor) in pinned:
            chosen.append(pinned[(1, minor)])
            continue
        in_minor = [
            v
            for v in releases
            if version_tuple(v)[:2] == (1, minor) and version_tuple(v) <= version_tuple(newest)
        ]
        if in_minor:
            chosen.append(max(in_minor, key=version_tuple))
    return chosen


@functools.cache
def sweep_targets() -> list[ComfyTarget]:
    """The sweep's entries: each frontend of sweep_frontends on the server of its time."""
    newest = newest_frontend()
    frontends = sweep_frontends(frontend_versions(), newest)
    return [ComfyTarget(sweep_server_for(f), f) for f in frontends]
