"""Write the Registry's URLs into pyproject.toml for one publish: Icon, Repository and Issues.

Run by .github/workflows/publish.yml right before `comfy node publish`, on the checked-out commit:
    python3 .github/registry_urls.py OWNER/NAME COMMIT_SHA [PYPROJECT]
The Registry takes the icon as a URL, and the repository and issue tracker as the addresses of the
repository the workflow runs in, so none of them is guessed in the committed file. Entries already
written as https:// addresses are kept. Exits 1, naming what is missing, if the result lacks one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


def rewrite(text: str, repo: str, sha: str) -> str:
    """Return pyproject.toml's text with Icon, Repository and Issues as addresses of repo at sha."""
    icon = re.search(r'^Icon = "([^"]+)"', text, re.M)
    if icon and not icon.group(1).startswith("https://"):
        url = f"https://raw.githubusercontent.com/{repo}/{sha}/{icon.group(1)}"
        text = text[: icon.start()] + f'Icon = "{url}"' + text[icon.end() :]
    urls = tomllib.loads(text).get("project", {}).get("urls", {})
    added = "".join(
        f'{name} = "{url}"\n'
        for name, url in (
            ("Repository", f"https://github.com/{repo}"),
            ("Issues", f"https://github.com/{repo}/issues"),
        )
        if name not in urls
    )
    if added:
        if "\n[project.urls]\n" not in text:
            raise SystemExit("pyproject.toml has no [project.urls] table to add the addresses to")
        text = text.replace("\n[project.urls]\n", "\n[project.urls]\n" + added, 1)
    return text


def problems(text: str) -> list[str]:
    """Return what the Registry would get wrong from this pyproject.toml (nothing when it is ready)."""
    config = tomllib.loads(text)
    urls = config.get("project", {}).get("urls", {})
    found = [
        f"{name} is not an https:// address"
        for name in ("Repository", "Issues")
        if not str(urls.get(name, "")).startswith("https://")
    ]
    if not str(config.get("tool", {}).get("comfy", {}).get("Icon", "")).startswith("https://"):
        found.append("Icon is not an https:// address")
    return found


def main(argv: list[str]) -> int:
    """Rewrite the file named on the command line (pyproject.toml by default); 1 if it is still not ready."""
    if (
        len(argv) not in (2, 3)
        or not re.fullmatch(r"[\w.-]+/[\w.-]+", argv[0])
        or not re.fullmatch(r"[0-9a-f]{40}", argv[1])
    ):
        print("usage: registry_urls.py OWNER/NAME COMMIT_SHA [PYPROJECT]", file=sys.stderr)
        return 2
    path = Path(argv[2] if len(argv) == 3 else "pyproject.toml")
    text = rewrite(path.read_text(encoding="utf-8"), argv[0], argv[1])
    path.write_text(text, encoding="utf-8")
    found = problems(text)
    for problem in found:
        print(f"error: {path}: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
