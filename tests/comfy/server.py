"""A running ComfyUI for tests: start it on a free loopback port with a fresh base directory and the
pack linked in, drive it over HTTP (upload, queue, wait, view, interrupt), stop it.

Measured here (2 cores, no GPU): boot to the first answer of GET /object_info 3.9-4.9 s; resident
memory about 440 MiB; tests/comfy as a whole on a warm cache about 15-20 s (four servers are started).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.comfy.errors import ComfyServerError, PromptRejected, PromptTimeout
from tests.comfy.install import PACK_LINK_NAME, REPO_ROOT, TORCHVISION_STUB_DIR, ComfyInstall

# Variables of the developer's machine that must not reach the server: proxies would swallow
# loopback traffic, a real key or base URL would leak into a test.
_SCRUBBED_ENV_PREFIXES = ("AITHRIVING_",)
_SCRUBBED_ENV = frozenset(
    {
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
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "VIRTUAL_ENV",
        "PIP_CONSTRAINT",
    }
)
_BASE_SUBDIRS = ("custom_nodes", "input", "output", "user", "temp", "models")
# Colour codes: ComfyUI 0.33.0 colours its log's level tags even into a file.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_HTTP_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds: loopback, but /object_info and uploads can be slow


def _die_with_parent() -> None:
    """In the child before exec: have Linux SIGTERM the server when the process that started it dies.

    Without this, a test run killed hard (SIGKILL, a CI time-out) leaves ComfyUI servers behind.
    Linux-only (prctl PR_SET_PDEATHSIG); elsewhere stop() is the only clean-up.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class ComfyServer:
    """One ComfyUI process on 127.0.0.1 with a fresh base directory and the pack linked into custom_nodes/.

    Use as a context manager, or call start() and stop(). Every HTTP call has a (connect, read) timeout.
    """

    def __init__(
        self,
        install: ComfyInstall,
        *,
        env: Mapping[str, str | None] | None = None,
        base_dir: Path | None = None,
        pack_dir: Path | None = REPO_ROOT,
        extra_args: Sequence[str] = (),
        boot_timeout: float = 240.0,  # 5-8 s on an idle machine; a loaded shared one can take minutes
    ) -> None:
        self.install = install
        self.extra_env = dict(env or {})
        self._owns_base_dir = base_dir is None
        self.base_dir = (
            Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="comfyui-base-"))
        )
        self.pack_dir = Path(pack_dir).resolve() if pack_dir is not None else None
        self.extra_args = tuple(extra_args)
        self.boot_timeout = boot_timeout
        self.port: int | None = None
        self.boot_seconds: float | None = None
        self._process: subprocess.Popen | None = None
        self._last_returncode: int | None = None
        self._log_handle = None
        self._session = None

    # -- paths ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise ComfyServerError("the server has not been started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def log_text(self) -> str:
        """Everything the server printed so far (stdout and stderr interleaved), without colour codes."""
        try:
            return _ANSI_ESCAPE.sub("", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _server_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _SCRUBBED_ENV and not k.startswith(_SCRUBBED_ENV_PREFIXES)
        }
        home = self.base_dir / "home"
        home.mkdir(exist_ok=True)
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(map(str, (*self.install.python_path, TORCHVISION_STUB_DIR))),
                "PYTHONUNBUFFERED": "1",
                "PYTHONNOUSERSITE": "1",
                # A fresh home: no key file, settings or caches of the developer's reach the server.
                "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_CACHE_HOME": str(home / ".cache"),
                # Nothing here downloads models; if something tries, fail fast instead of hanging.
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "DO_NOT_TRACK": "1",
                "NO_PROXY": "127.0.0.1,localhost",
            }
        )
        for key, value in self.extra_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def _prepare_base_dir(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for name in _BASE_SUBDIRS:
            (self.base_dir / name).mkdir(exist_ok=True)
        if self.pack_dir is not None:
            link = self.custom_nodes_dir / PACK_LINK_NAME
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(self.pack_dir, target_is_directory=True)

    def start(self) -> ComfyServer:
        """Start the process and wait until GET /object_info answers; raise with the log's tail if not."""
        if self._process is not None:
            raise ComfyServerError("this ComfyServer was already started")
        import requests  # the set-up CLI needs only the standard library

        self._session = requests.Session()
        self._session.trust_env = False  # no proxy, no .netrc: this is loopback only
        self._prepare_base_dir()
        started = time.monotonic()
        for attempt in range(3):
            self.port = free_port()
            self._spawn()
            if self._wait_until_up():
                self.boot_seconds = time.monotonic() - started
                return self
            log = self.log_text()
            self._reap()
            # Another process took the port between free_port() and bind(): try another one.
            if "address already in use" in log.lower() and attempt < 2:
                continue
            self.stop()
            raise ComfyServerError(
                f"ComfyUI exited with code {self._last_returncode} while starting\n"
                f"--- last lines of {self.log_path} ---\n{_tail(log)}"
            )
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        cmd = [
            str(self.install.python),
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
            *self.extra_args,
        ]
        self._log_handle = open(self.log_path, "ab")
        self._log_handle.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_handle.flush()
        self._process = subprocess.Popen(
            cmd,
            cwd=self.install.comfy_dir,
            env=self._server_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            # Its own process group, so stop() can signal anything it spawned, and a Ctrl-C in the
            # test terminal reaches pytest (which then stops it) rather than racing it.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _wait_until_up(self) -> bool:
        import requests

        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                response = self._session.get(f"{self.url}/object_info", timeout=(1.0, 30.0))
                if response.status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.2)
        log = self.log_text()
        self.stop()
        raise ComfyServerError(
            f"ComfyUI did not answer GET /object_info within {self.boot_timeout:.0f} s\n"
            f"--- last lines of {self.log_path} ---\n{_tail(log)}"
        )

    def _reap(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            self._last_returncode = process.returncode
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after timeout seconds; always reaps the process (no zombie)."""
        self._reap(timeout)
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._owns_base_dir and os.environ.get("COMFY_HARNESS_KEEP_BASE") != "1":
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- HTTP ---------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any):
        """One HTTP call to this server (a requests.Response), with the harness's default timeout."""
        if self._session is None:
            raise ComfyServerError("the server is not running")
        kwargs.setdefault("timeout", _HTTP_TIMEOUT)
        return self._session.request(method, f"{self.url}{path}", **kwargs)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code != 200:
            raise ComfyServerError(
                f"{method} {path} answered HTTP {response.status_code}: {response.text[:500]}"
            )
        return response.json()

    def object_info(self, node_id: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/{node_id} (that node's entry, or {} if unknown)."""
        if node_id is None:
            return self._json("GET", "/object_info")
        return self._json("GET", f"/object_info/{node_id}").get(node_id, {})

    def upload_image(
        self,
        image: Path | str | bytes,
        name: str | None = None,
        *,
        subfolder: str = "",
        overwrite: bool = True,
    ) -> str:
        """POST /upload/image; returns the value for LoadImage's `image` input."""
        if isinstance(image, (str, Path)):
            data = Path(image).read_bytes()
            name = name or Path(image).name
        else:
            data = bytes(image)
        if not name:
            raise ValueError("upload_image needs a name when given bytes")
        form = {"type": "input", "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        answer = self._json(
            "POST", "/upload/image", files={"image": (name, data, "application/octet-stream")}, data=form
        )
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def queue_prompt(
        self,
        api_graph: Mapping[str, Any],
        client_id: str | None = None,
        *,
        workflow: Mapping[str, Any] | None = None,
        extra_data: Mapping[str, Any] | None = None,
    ) -> str:
        """POST /prompt; returns the prompt id. workflow (UI format) is what SaveImage embeds as
        `workflow`."""
        body: dict[str, Any] = {"prompt": dict(api_graph), "client_id": client_id or uuid.uuid4().hex}
        extra = dict(extra_data or {})
        if workflow is not None:
            extra.setdefault("extra_pnginfo", {})["workflow"] = workflow
        if extra:
            body["extra_data"] = extra
        response = self.request("POST", "/prompt", json=body)
        if response.status_code == 400:
            answer = response.json()
            raise PromptRejected(
                _describe_rejection(answer), error=answer.get("error"), node_errors=answer.get("node_errors")
            )
        if response.status_code != 200:
            raise ComfyServerError(
                f"POST /prompt answered HTTP {response.status_code}: {response.text[:500]}"
            )
        return response.json()["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 120.0, poll_interval: float = 0.1) -> dict:
        """Poll GET /history/{prompt_id} until the prompt has finished (success or error); return its
        entry."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self._json("GET", f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if not self.is_running():
                raise ComfyServerError(
                    f"ComfyUI died while running prompt {prompt_id}\n--- log tail "
                    f"---\n{_tail(self.log_text())}"
                )
            if time.monotonic() > deadline:
                raise PromptTimeout(
                    f"prompt {prompt_id} did not finish within {timeout:.0f} s; queue: {self.queue()}\n"
                    f"--- log tail ---\n{_tail(self.log_text())}"
                )
            time.sleep(poll_interval)

    def run(self, api_graph: Mapping[str, Any], timeout: float = 120.0, **queue_kwargs: Any) -> dict:
        """queue_prompt() then wait_for(): the finished history entry."""
        return self.wait_for(self.queue_prompt(api_graph, **queue_kwargs), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stop the running prompt (only that one if prompt_id is given)."""
        response = self.request("POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else {})
        if response.status_code != 200:  # it answers 200 with an empty body
            raise ComfyServerError(
                f"POST /interrupt answered HTTP {response.status_code}: {response.text[:500]}"
            )

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:  # noqa: A002 (ComfyUI's name)
        """GET /view: the bytes of a file in output/, input/ or temp/."""
        response = self.request(
            "GET", "/view", params={"filename": filename, "subfolder": subfolder, "type": type}
        )
        if response.status_code != 200:
            raise ComfyServerError(
                f"GET /view {subfolder}/{filename} ({type}) answered HTTP {response.status_code}"
            )
        return response.content

    def history(self, max_items: int | None = None) -> dict:
        """GET /history: finished prompts by id."""
        return self._json("GET", "/history", params={"max_items": max_items} if max_items else None)

    def queue(self) -> dict:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}."""
        return self._json("GET", "/queue")

    def custom_node_import_status(self, folder_name: str = PACK_LINK_NAME) -> str | None:
        """'loaded', 'failed' or None (not listed) for a custom_nodes/ folder, from the start-up log."""
        # "   0.4 seconds: <folder>", after a "[INFO] " level tag from ComfyUI 0.33.0 on.
        pattern = re.compile(r"^(?:\[[A-Z]+\])?\s*[\d.]+ seconds( \(IMPORT FAILED\))?: (.+)$")
        for line in self.log_text().splitlines():
            match = pattern.match(line)
            if match and Path(match.group(2).strip()).name == folder_name:
                return "failed" if match.group(1) else "loaded"
        return None


def _describe_rejection(answer: Mapping[str, Any]) -> str:
    error = answer.get("error") or {}
    parts = [f"ComfyUI rejected the prompt: {error.get('message', error)} {error.get('details', '')}".strip()]
    for node_id, node_error in (answer.get("node_errors") or {}).items():
        for item in node_error.get("errors", []):
            parts.append(
                f"node {node_id} ({node_error.get('class_type')}): {item.get('message')}: "
                f"{item.get('details')}"
            )
    return "\n".join(parts)


def execution_error(entry: Mapping[str, Any]) -> dict | None:
    """The `execution_error` message of a finished history entry, or None if it succeeded."""
    for message in entry.get("status", {}).get("messages", []):
        if message[0] == "execution_error":
            return message[1]
    return None


def saved_images(entry: Mapping[str, Any]) -> list[dict]:
    """Every {filename, subfolder, type} image a finished prompt reported, in node-id order."""
    images = []
    for _node_id, output in sorted(entry.get("outputs", {}).items(), key=lambda kv: kv[0]):
        images.extend(output.get("images", []))
    return images
