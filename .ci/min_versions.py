"""The minimum-versions lane: the client and reliability suites on the lowest versions our requirements allow.

Installs, in a venv of its own (kept under .cache/min-versions/ while nothing it depends on changes):
the floors pyproject.toml declares for requests, numpy and pillow, exactly; urllib3 at the lowest
version that requests floor admits; torch==2.13.0 (test_inputs converts tensors) and the test tools.
Then runs the suites with the versions printed first. Fails when requirements.txt and pyproject.toml
disagree, or when a runtime dependency has no ``>=`` floor.

    python .ci/min_versions.py [extra pytest arguments]
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the lane runs on 3.11 (CI's Python), as its floors were chosen for
    sys.exit("The minimum-versions lane needs Python 3.11 or later (tomllib).")

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "min-versions"
TORCH = "torch==2.13.0"
TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"]
SUITES = [
    "tests/test_client.py",
    "tests/test_cli.py",
    "tests/test_config.py",
    "tests/test_settings.py",
    "tests/reliability",
    "-m",
    "not comfyui",
]
_FLOOR = re.compile(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)$")


def declared_floors() -> dict[str, str]:
    """{name: floor} of the runtime dependencies; pyproject.toml and requirements.txt must list the same."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    listed = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if sorted(project["dependencies"]) != sorted(listed):
        sys.exit(f"requirements.txt {listed} and pyproject.toml {project['dependencies']} disagree.")
    floors = {}
    for requirement in project["dependencies"]:
        match = _FLOOR.match(requirement)
        if match is None:
            sys.exit(f"{requirement!r}: every runtime dependency needs a plain '>=' floor for this lane.")
        floors[match.group(1).lower()] = match.group(2)
    return floors


def urllib3_floor(python: Path) -> str:
    """The lowest urllib3 the installed requests admits (its own Requires-Dist)."""
    code = "import importlib.metadata as m; print('\\n'.join(m.requires('requests') or []))"
    requires = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout
    for line in requires.splitlines():
        if re.match(r"urllib3\b", line) and ";" not in line:
            found = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", line)
            if found:
                return found.group(1)
    sys.exit(f"requests declares no urllib3 floor: {requires!r}")


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], check=True)


def build(venv_dir: Path, floors: dict[str, str]) -> Path:
    """A fresh venv with the floors installed exactly; its python."""
    shutil.rmtree(venv_dir, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    python = venv_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    # torch first and on its own: its dependencies must not choose numpy for us.
    pip(python, TORCH)
    pip(python, *[f"{name}=={version}" for name, version in floors.items()])
    pip(python, f"urllib3=={urllib3_floor(python)}")
    pip(python, *TEST_TOOLS)
    pip(python, "--no-deps", "-e", str(ROOT))
    # The floors again, in case a test tool raised one of them; then nothing may be inconsistent.
    pip(python, *[f"{name}=={version}" for name, version in floors.items()])
    subprocess.run([str(python), "-m", "pip", "check"], check=True)
    return python


def _release(version: str) -> tuple[int, ...]:
    """1.24 and 1.24.0 alike, as pip's == compares them."""
    parts = [int(part) for part in re.findall(r"\d+", version)]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def main() -> int:
    floors = declared_floors()
    stamp = hashlib.sha256(
        json.dumps([floors, TORCH, TEST_TOOLS, sys.version, Path(__file__).read_bytes().hex()]).encode()
    ).hexdigest()
    venv_dir = CACHE / "venv"
    stamp_file = CACHE / "stamp"
    python = venv_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    if not (stamp_file.is_file() and stamp_file.read_text() == stamp and python.exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        python = build(venv_dir, floors)
        stamp_file.write_text(stamp)
    show = (
        "import importlib.metadata as m; print('minimum versions:', ', '.join(f'{n} {m.version(n)}' "
        "for n in ('requests', 'urllib3', 'numpy', 'pillow', 'torch')))"
    )
    subprocess.run([str(python), "-c", show], check=True)
    installed = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in json.loads(sys.argv[1])}))",
            json.dumps(list(floors)),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = {name: _release(version) for name, version in json.loads(installed).items()}
    if found != {name: _release(version) for name, version in floors.items()}:
        sys.exit(f"the venv holds {installed.strip()}, not the floors {floors}")
    pytest = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES, *sys.argv[1:]]
    return subprocess.run(pytest, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
