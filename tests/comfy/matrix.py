"""The ComfyUI versions and frontends the real-ComfyUI and browser tests run against (the CI matrix).

Each entry is a pytest parameter whose id names the server and the frontend, so a failure says which:

==================================  ===========  ==========================================================
id                                  ComfyUI      frontend
==================================  ===========  ==========================================================
comfyui-0.3.75+frontend-1.32.9      0.3.75       the one it pins (requirements.txt)
comfyui-0.3.75+frontend-newest      0.3.75       the newest ``comfyui-frontend-package`` on the index when
                                                 the tests run (``--front-end-root``); hold it back with
                                                 ``NEWEST_FRONTEND_HOLD`` below or ``$COMFY_FRONTEND_NEWEST``
comfyui-0.3.52+frontend-1.25.10     0.3.52       the one it pins (the oldest server on the index)
==================================  ===========  ==========================================================

The node tests (tests/comfy) run on each server (``comfyui-0.3.75``, ``comfyui-0.3.52``); the
frontend does not take part there. The resolved versions are printed in the pytest header and in the
terminal summary. ``$COMFY_MATRIX`` (comma-separated ids, or parts of ids) runs a subset locally,
e.g. ``COMFY_MATRIX=newest``; unset, everything runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from tests.comfy.harness import (
    COMFYUI_VERSION,
    DEFAULT_CACHE_DIR,
    ComfyInstall,
    ensure_comfyui,
    ensure_frontend,
    newest_frontend_version,
)

OLDEST_COMFYUI = "0.3.52"
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
    ComfyTarget(COMFYUI_VERSION, "newest"),
    ComfyTarget(OLDEST_COMFYUI, "pinned", "1.25.10"),
)
ALL_SERVER_VERSIONS = (COMFYUI_VERSION, OLDEST_COMFYUI)
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
    chosen = set(_selected([t.id for t in UI_TARGETS], [t.id for t in ALL_UI_TARGETS]))
    return [t for t in ALL_UI_TARGETS if t.id in chosen]


def selected_server_versions() -> list[str]:
    chosen = set(_selected([f"comfyui-{v}" for v in SERVER_VERSIONS], [f"comfyui-{v}" for v in ALL_SERVER_VERSIONS]))
    return [v for v in ALL_SERVER_VERSIONS if f"comfyui-{v}" in chosen]


def record(target_id: str, comfyui: str, frontend: str | None = None) -> None:
    RESOLVED[target_id] = f"ComfyUI {comfyui}" + (f", frontend {frontend}" if frontend else "")
