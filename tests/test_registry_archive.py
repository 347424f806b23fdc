"""The archive `comfy node publish` would upload to the Comfy Registry: runtime files only, nothing the
scanner rejects.

comfy-cli (1.23, `comfy_cli/file_utils.py: zip_files`) packs the git-tracked files (`git ls-files`),
drops those matching `.comfyignore` (gitignore patterns, through the `pathspec` library), and adds
the folders listed in `[tool.comfy] includes`. This test builds the same archive the same way
(comfy-cli itself is not a dependency: it pulls in a whole CLI stack) and checks:

- it holds what the pack needs at run time (entry point, node, client, web extension and help pages,
  translations, example workflows with thumbnails and their input image, metadata) and nothing else;
- none of what the Registry's checks reject: `comfy node publish` runs ruff's S102 (exec), S307
  (eval) and E702 (statements joined by ";"); the Registry's scan also flags subprocess and other
  ways to run programs, pip installs at run time, and obfuscated code.
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import tokenize
import warnings
import zipfile
from pathlib import Path

import pathspec
import pytest
import tomllib
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Exactly what may ship: anything else tracked must be listed in .comfyignore.
RUNTIME_PATTERNS = [
    r"__init__\.py",
    r"nodes\.py",
    r"server_routes\.py",
    r"requirements\.txt",
    r"pyproject\.toml",
    r"README\.md",
    r"LICENSE",
    r"CHANGELOG\.md",
    r"icon\.png",
    r"node_list\.json",
    r"structure_api/[a-z_]+\.py",
    r"structure_api/standin/[a-z_]+\.py",
    r"structure_api/images/[a-z_]+\.py",
    r"structure_api/cli/[a-z_]+\.py",
    r"web/[a-z0-9_]+\.js",
    r"web/docs/AIThrivingStructure\.md",
    r"web/docs/AIThrivingStructure/[a-z]{2}(-[A-Z]{2})?\.md",
    r"locales/[a-z]{2}(-[A-Z]{2})?/(main|nodeDefs|commands|settings)\.json",
    r"example_workflows/[a-z_]+\.(json|jpg)",
    r"example_workflows/structure_example\.png",
]
REQUIRED = [
    "__init__.py",
    "nodes.py",
    "server_routes.py",
    "requirements.txt",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "CHANGELOG.md",
    "icon.png",
    "node_list.json",
    "structure_api/__init__.py",
    "structure_api/client.py",
    "structure_api/standin/__init__.py",
    "web/aithriving_structure.js",
    "web/aithriving_setup.js",
    "web/docs/AIThrivingStructure.md",
    "locales/en/nodeDefs.json",
    "locales/en/main.json",
    "locales/fr/nodeDefs.json",
    "example_workflows/structure_example.png",
]
NEVER = ("tests/", "benchmarks/", "docs/", ".ci/", ".cache/", ".venv/", ".git/", ".github/")
MAX_ARCHIVE_BYTES = 2 * 2**20

# What runs other programs or code from strings.
BANNED_CALLS = {"eval", "exec", "__import__"}
BANNED_MODULES = {"subprocess", "pty", "ensurepip", "pip", "marshal", "ctypes", "multiprocessing"}
BANNED_OS_ATTRIBUTES = re.compile(
    r"^(system|popen|exec[lv]p?e?|spawn[lv]p?e?|posix_spawnp?|fork|forkpty|startfile)$"
)
PIP_INSTALL = re.compile(r"\bpip\b.{0,40}\binstall\b", re.IGNORECASE | re.DOTALL)
LONG_ENCODED_TEXT = re.compile(r"[A-Za-z0-9+/=_-]{200,}")  # a blob of base64/hex in code is obfuscation
JS_BANNED = re.compile(
    r"\beval\s*\(|\bnew\s+Function\s*\(|\bFunction\s*\(\s*['\"]|child_process|\bimportScripts\s*\(|"
    r"\bsetTimeout\s*\(\s*['\"`]|\bsetInterval\s*\(\s*['\"`]"
)


def tracked_files() -> list[str]:
    if not (REPO / ".git").exists():
        if os.environ.get("CI"):
            pytest.fail("the Registry archive check needs the git checkout", pytrace=False)
        pytest.skip("not a git checkout: comfy-cli packs git-tracked files")
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def comfyignore() -> pathspec.PathSpec:
    lines = [line.strip() for line in (REPO / ".comfyignore").read_text(encoding="utf-8").splitlines()]
    with warnings.catch_warnings():
        # comfy-cli asks pathspec for "gitwildmatch", which pathspec 1.x deprecates but still honours.
        warnings.simplefilter("ignore", DeprecationWarning)
        return pathspec.PathSpec.from_lines(
            "gitwildmatch", [ln for ln in lines if ln and not ln.startswith("#")]
        )


def registry_archive(target: Path) -> Path:
    """The archive comfy-cli's zip_files() makes for this repository, written to target."""
    ignore = comfyignore()
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"].get("includes", [])
    prefixes = [os.path.normpath(i.lstrip("/")).replace(os.sep, "/") for i in includes]

    def ignored(name: str) -> bool:
        forced = any(name == p or name.startswith(p + "/") for p in prefixes)
        return not forced and ignore.match_file(name)

    names = [n for n in tracked_files() if not ignored(n) and (REPO / n).exists()]
    for include in prefixes:
        for path in sorted((REPO / include).rglob("*")):
            name = path.relative_to(REPO).as_posix()
            if path.is_file() and name not in names and not ignored(name):
                names.append(name)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.write(REPO / name, name)
    return target


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> zipfile.ZipFile:
    path = registry_archive(tmp_path_factory.mktemp("registry") / "node.zip")
    with zipfile.ZipFile(path) as opened:
        yield opened


def python_problems(name: str, source: str) -> list[str]:
    problems = []
    tree = ast.parse(source, filename=name)
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            func = node.func
            called = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else None
            )
            if called in BANNED_CALLS:
                problems.append(f"{where}: calls {called}()")
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and BANNED_OS_ATTRIBUTES.match(node.attr)
        ):
            problems.append(f"{where}: uses os.{node.attr}")
        if isinstance(node, ast.Import):
            problems += [
                f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES
            ]
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in BANNED_MODULES:
            problems.append(f"{where}: imports from {node.module}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if PIP_INSTALL.search(node.value):
                problems.append(f"{where}: a pip install command in a string")
            if LONG_ENCODED_TEXT.search(node.value):
                problems.append(f"{where}: a long encoded blob in a string")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.OP and token.string == ";":  # ruff E702/E703
            problems.append(f"{name}:{token.start[0]}: statements joined by ';'")
    return problems


def javascript_problems(name: str, source: str) -> list[str]:
    problems = [
        f"{name}:{source.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for m in JS_BANNED.finditer(source)
    ]
    problems += [f"{name}: a long encoded blob" for _ in LONG_ENCODED_TEXT.finditer(source)]
    return problems


def test_archive_holds_the_runtime_files(archive):
    names = set(archive.namelist())
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"missing from the Registry archive: {missing}"
    # Every module of the client, every workflow with its thumbnail, every help page and language.
    for path in [
        *REPO.glob("structure_api/**/*.py"),
        *REPO.glob("web/**/*.md"),
        *REPO.glob("web/*.js"),
        *REPO.glob("locales/*/*.json"),
        *REPO.glob("example_workflows/*.json"),
    ]:
        assert path.relative_to(REPO).as_posix() in names, path
    for workflow in REPO.glob("example_workflows/*.json"):
        assert f"example_workflows/{workflow.stem}.jpg" in names, f"{workflow.stem} has no thumbnail"


def test_archive_holds_nothing_else(archive):
    names = archive.namelist()
    strays = [n for n in names if not any(re.fullmatch(p, n) for p in RUNTIME_PATTERNS)]
    assert not strays, f"not runtime files (add them to .comfyignore): {strays}"
    assert not [n for n in names if n.startswith(NEVER) or "__pycache__" in n or n.endswith(".pyc")]
    size = sum(info.compress_size for info in archive.infolist())
    assert size < MAX_ARCHIVE_BYTES, f"the archive is {size / 2**20:.1f} MiB"


def test_help_pages_are_not_taken_for_documentation_sources():
    # "/docs/" must only match the top-level folder: web/docs/ is what the node's help button opens.
    spec = comfyignore()
    assert spec.match_file("docs/screenshots/help-page.png")
    assert not spec.match_file("web/docs/AIThrivingStructure.md")
    assert not spec.match_file("web/docs/AIThrivingStructure/fr.md")


def test_nothing_in_the_archive_trips_the_registry_scanner(archive):
    problems = []
    for name in archive.namelist():
        if name.endswith(".py"):
            problems += python_problems(name, archive.read(name).decode("utf-8"))
        elif name.endswith(".js"):
            problems += javascript_problems(name, archive.read(name).decode("utf-8"))
    assert not problems, "\n".join(problems)


def test_scanner_checks_do_catch_what_they_look_for():
    bad_python = (
        "import subprocess\nfrom pip._internal import main\nimport os\n"
        "os.system('ls')\neval('1')\nexec(compile('x', 'f', 'exec'))\n"
        "CMD = 'python -m pip install torch'\nx = 1; y = 2\n"
        f"BLOB = '{'QUJD' * 60}'\n"
    )
    found = "\n".join(python_problems("bad.py", bad_python))
    for expected in (
        "imports subprocess",
        "imports from pip._internal",
        "os.system",
        "calls eval()",
        "calls exec()",
        "pip install",
        "joined by ';'",
        "encoded blob",
    ):
        assert expected in found, expected
    found_js = javascript_problems("bad.js", "eval('x'); new Function('return 1'); require('child_process')")
    assert len(found_js) == 3


def test_registry_metadata():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy, project = config["tool"]["comfy"], config["project"]
    assert comfy["PublisherId"] == "aithriving" and comfy["DisplayName"] == "AIThriving Structure"
    # The icon ships in the pack (the publish workflow turns the path into its raw URL): a format and a
    # size the Registry takes.
    icon = REPO / comfy["Icon"]
    with Image.open(icon) as picture:
        assert picture.format in ("PNG", "JPEG", "GIF") and picture.width <= 800 and picture.height <= 400
    assert project["license"] == "MIT"  # a plain SPDX string (the table form stops building in 2027)
    # comfy-cli's accepted form: [operator]major.minor.patch, comma-separated.
    assert re.fullmatch(
        r"(==|>=|<=|!=|~=|>|<)?\d+\.\d+\.\d+(,\s*(==|>=|<=|!=|~=|>|<)?\d+\.\d+\.\d+)*",
        comfy["requires-comfyui"],
    )
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (
        re.fullmatch(r"[a-z][a-z0-9]*([-_.][a-z0-9]+)*", project["name"]) and "comfy" not in project["name"]
    )
    # ComfyUI-Manager installs requirements.txt; pip installs pyproject's list: the same packages.
    requirements = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines() if ln.strip()]
    assert sorted(requirements) == sorted(project["dependencies"])
    assert not [d for d in project["dependencies"] if re.match(r"(torch|torchvision|torchaudio)\b", d)]


def test_node_list_names_every_node_of_the_pack():
    # ComfyUI-Manager's missing-node scan reads NODE_CLASS_MAPPINGS, which a V3-only pack does not have;
    # node_list.json (node id -> display name) is what it reads instead. It must match the schemas.
    import json

    listed = json.loads((REPO / "node_list.json").read_text())
    source = (REPO / "nodes.py").read_text()
    node_ids = set(re.findall(r"""node_id\s*=\s*["']([^"']+)["']""", source))
    assert node_ids and set(listed) == node_ids
    english = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text())
    assert all(listed[node] == english[node]["display_name"] for node in node_ids)
