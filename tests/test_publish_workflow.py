"""The Registry publish workflow (.github/workflows/publish.yml) publishes the URLs it writes.

comfy-cli sends the pyproject.toml of the working tree as it is when `comfy node publish` runs: the
rewrite of Icon, Repository and Issues (.github/registry_urls.py) must come after every checkout and
before the publish, and no step in between may check the repository out again (publish-node-action's
own checkout did, so the Registry got Icon = "icon.png" and no Repository).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "publish.yml"
SCRIPT = REPO / ".github" / "registry_urls.py"
SHA = "0123456789abcdef0123456789abcdef01234567"


def steps() -> list[dict]:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    assert list(jobs) == ["publish"]
    return jobs["publish"]["steps"]


def index_of(found: list[dict], what, label: str) -> int:
    matches = [i for i, step in enumerate(found) if what(step)]
    assert len(matches) == 1, f"{label}: {len(matches)} steps"
    return matches[0]


def is_checkout(step: dict) -> bool:
    # actions/checkout, an action that runs it inside (publish-node-action), or a git command that
    # resets files.
    uses = step.get("uses", "")
    run = step.get("run", "")
    return uses.startswith(("actions/checkout", "Comfy-Org/publish-node-action")) or any(
        command in run for command in ("git checkout", "git reset", "git restore", "git stash", "git clean")
    )


def test_rewrite_comes_after_the_checkout_and_right_before_the_publish():
    found = steps()
    checkout = index_of(found, lambda s: s.get("uses", "").startswith("actions/checkout"), "checkout")
    rewrite = index_of(found, lambda s: ".github/registry_urls.py" in s.get("run", ""), "rewrite")
    publish = index_of(found, lambda s: "comfy node publish" in s.get("run", ""), "publish")
    assert checkout < rewrite < publish
    assert not [s for s in found[rewrite + 1 :] if is_checkout(s)], "a checkout after the rewrite undoes it"
    # The publish runs in the same working tree the rewrite wrote (no other directory, no other job).
    assert not found[publish].get("working-directory") and not found[rewrite].get("working-directory")
    # Both run on the same condition, so a rewrite never happens without its publish or the other way round.
    assert found[rewrite].get("if") == found[publish].get("if")
    # The token comes from the secret through the environment, never written into the command line's text.
    assert "secrets.REGISTRY_ACCESS_TOKEN" in str(found[publish].get("env"))
    assert "secrets." not in found[publish]["run"]


def test_no_action_that_checks_out_on_its_own():
    assert not [s for s in steps() if s.get("uses", "").startswith("Comfy-Org/publish-node-action")]


def test_the_order_check_sees_a_late_checkout():
    bad = [
        {"uses": "actions/checkout@v4"},
        {"run": "python .github/registry_urls.py a/b c"},
        {"uses": "Comfy-Org/publish-node-action@v1"},
        {"run": "comfy node publish"},
    ]
    rewrite = 1
    assert [s for s in bad[rewrite + 1 :] if is_checkout(s)]


def run_script(tmp_path: Path, text: str, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    target = tmp_path / "pyproject.toml"
    target.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, str(target)], capture_output=True, text=True, timeout=60
    )
    return done, target.read_text(encoding="utf-8")


def test_rewrite_writes_the_registry_urls_of_the_repository_and_commit(tmp_path):
    committed = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    done, text = run_script(tmp_path, committed, "someone/some-pack", SHA)
    assert done.returncode == 0, done.stderr
    config = tomllib.loads(text)
    icon = config["tool"]["comfy"]["Icon"]
    committed_icon = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]["Icon"]
    assert icon == f"https://raw.githubusercontent.com/someone/some-pack/{SHA}/{committed_icon}"
    urls = config["project"]["urls"]
    assert urls["Repository"] == "https://github.com/someone/some-pack"
    assert urls["Issues"] == "https://github.com/someone/some-pack/issues"
    assert urls["Homepage"] == "https://www.aithriving.com"
    # Everything else as committed (comments and all).
    before = (REPO / "pyproject.toml").read_text(encoding="utf-8").splitlines()
    after = text.splitlines()
    assert [line for line in after if line not in before] == [
        line for line in after if line.startswith(("Icon =", "Repository =", "Issues ="))
    ]
    # Run twice: the same file.
    again, text_again = run_script(tmp_path, text, "someone/some-pack", SHA)
    assert again.returncode == 0 and text_again == text


@pytest.mark.parametrize("args", [("someone", SHA), ("someone/pack", "main"), ("someone/pack",)])
def test_rewrite_refuses_what_is_not_a_repository_and_commit(tmp_path, args):
    done, text = run_script(tmp_path, "[project.urls]\n", *args)
    assert done.returncode == 2 and "usage" in done.stderr and text == "[project.urls]\n"


def test_rewrite_fails_when_the_result_is_not_ready(tmp_path):
    # No [tool.comfy] Icon at all: the Registry would get no icon, so the publish must not run.
    done, _ = run_script(
        tmp_path, '[project]\nname = "x"\n\n[project.urls]\nHomepage = "https://x.org"\n', "someone/pack", SHA
    )
    assert done.returncode == 1 and "Icon" in done.stderr


def test_pyproject_declares_what_the_registry_and_manager_read():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "Operating System :: OS Independent" in project["classifiers"]
    assert project["urls"]["Homepage"].startswith("https://")
