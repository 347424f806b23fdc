"""Run comfy-test's lint (the Registry tooling's static checks) on what the pack ships.

    python .ci/comfy_test_lint.py       (from the repository root, with the project's .venv active)

comfy-test is not a dependency of the pack or its tests: it is installed into its own venv,
.cache/comfy-test-venv (kept between runs; rebuilt when COMFY_TEST_VERSION changes).

What it lints is the archive `comfy node publish` uploads (tests/test_registry_archive.py builds it as
comfy-cli does), unpacked into a temporary folder, with --strict (JavaScript warnings fail too).
comfy-test's SYNTAX level reads every .py file under the folder it is given; in the checkout that
includes tests/ and benchmarks/, which never ship (.comfyignore) and hold non-cp1252 text on
purpose: Unicode test data (Arabic-Indic digits, emoji, CJK prompts) and report tables with arrows
and signs. Its cp1252 rule guards the consoles of Windows users, who run only the shipped files, so
the rule does not apply to those two folders; this script also lints the whole checkout and fails if
a finding there names a file the archive ships.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_TEST_VERSION = "0.4.15"
VENV = REPO / ".cache" / "comfy-test-venv"
MARKER = VENV / "comfy-test-version.txt"


def comfy_test() -> Path:
    """The comfy-test command of the scratch venv (built on first use)."""
    binary = VENV / ("Scripts/comfy-test.exe" if os.name == "nt" else "bin/comfy-test")
    if binary.is_file() and MARKER.is_file() and MARKER.read_text().strip() == COMFY_TEST_VERSION:
        return binary
    venv.create(VENV, with_pip=True, clear=True)
    python = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"comfy-test=={COMFY_TEST_VERSION}"], check=True
    )
    MARKER.write_text(COMFY_TEST_VERSION + "\n")
    return binary


def lint(binary: Path, folder: Path) -> dict:
    """comfy-test lint --strict --json on a folder: its answer, with the exit status added."""
    done = subprocess.run(
        [str(binary), "lint", "--strict", "--json", str(folder)], capture_output=True, text=True, timeout=300
    )
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        sys.exit(f"comfy-test lint printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    answer["returncode"] = done.returncode
    return answer


def flagged_files(answer: dict) -> set[str]:
    """The files the SYNTAX level names in its details (a 'path:' line heads each file's findings)."""
    details = answer["results"].get("syntax", {}).get("details") or ""
    return {match.group(1) for match in re.finditer(r"^\s*([\w./\\-]+\.py):\s*$", details, re.M)}


def main() -> int:
    """Lint the shipped archive, then check that every finding in the checkout is outside it; 0 if clean."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from tests.test_registry_archive import registry_archive

    binary = comfy_test()
    with tempfile.TemporaryDirectory(prefix="comfy-test-lint-") as scratch:
        root = Path(scratch)
        archive = registry_archive(root / "node.zip")
        shipped_dir = root / "pack"
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(shipped_dir)
            shipped = set(opened.namelist())
        answer = lint(binary, shipped_dir)
    shown = ("passed", "error", "details", "summary")
    print(
        json.dumps(
            {
                name: {k: v for k, v in result.items() if k in shown}
                for name, result in answer["results"].items()
            },
            indent=2,
        )
    )
    if answer["returncode"] != 0 or not answer["passed"]:
        print("comfy-test lint: the shipped files fail (see above)", file=sys.stderr)
        return 1
    whole = lint(binary, REPO)
    not_applicable = flagged_files(whole)
    in_archive = sorted(name for name in not_applicable if name.replace(os.sep, "/") in shipped)
    outside = [
        name for name in not_applicable if not name.replace(os.sep, "/").startswith(("tests/", "benchmarks/"))
    ]
    if in_archive or outside:
        print(
            f"comfy-test lint flags shipped or unexplained files in the checkout: {in_archive or outside}",
            file=sys.stderr,
        )
        return 1
    print(
        f"comfy-test {COMFY_TEST_VERSION} lint: the shipped files pass; findings only in files that never "
        f"ship ({len(not_applicable)}: tests/, benchmarks/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
