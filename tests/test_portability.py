"""Product code uses no POSIX-only name unguarded: Windows (most ComfyUI users) has none of them.

A use is guarded when it sits under an ``if`` or ``try`` that names the platform (sys.platform, os.name,
hasattr/getattr checks, ``msvcrt``/``fcntl`` is None) or an ``except ImportError``/``AttributeError``, or
when the name is read through ``getattr(os, "O_...", 0)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = sorted(
    [
        *(REPO / "structure_api").rglob("*.py"),
        REPO / "nodes.py",
        REPO / "server_routes.py",
        REPO / "__init__.py",
    ]
)

# os attributes Windows lacks (or that do nothing useful there).
POSIX_OS_NAMES = {
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getpgid",
    "setsid",
    "setpgrp",
    "killpg",
    "fork",
    "forkpty",
    "mkfifo",
    "mknod",
    "fchmod",
    "fchown",
    "chown",
    "lchown",
    "getpwuid",
    "sync",
    "fdatasync",
    "getloadavg",
    "pipe2",
    "sched_getaffinity",
    "nice",
    "uname",
    "statvfs",
    "fstatvfs",
    "WNOHANG",
    "posix_fadvise",
}
POSIX_MODULES = {"fcntl", "termios", "tty", "pty", "pwd", "grp", "resource", "posix", "syslog", "crypt"}
# signal names: SIGINT (and the handlers' own names) exist everywhere; the rest are POSIX only.
PORTABLE_SIGNAL_NAMES = {
    "SIGINT",
    "SIG_DFL",
    "SIG_IGN",
    "signal",
    "getsignal",
    "default_int_handler",
    "SIGTERM",
    "SIGABRT",
    "Signals",
    "Handlers",
}
GUARD_WORDS = ("platform", "os.name", "hasattr", "getattr", "msvcrt", "fcntl", "supports_fd", "win32")


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True when an enclosing if/try (or conditional expression) checks the platform or catches its
    absence."""
    current = node
    while current in parents:
        parent = parents[current]
        if isinstance(parent, (ast.If, ast.IfExp, ast.While)):
            if any(word in ast.unparse(parent.test) for word in GUARD_WORDS):
                return True
        if isinstance(parent, ast.Try) and current in parent.body:
            caught = " ".join(ast.unparse(handler.type) for handler in parent.handlers if handler.type)
            if "ImportError" in caught or "AttributeError" in caught:
                return True
        if isinstance(parent, ast.Call) and ast.unparse(parent.func) == "getattr":
            return True
        current = parent
    return False


def posix_uses(path: Path) -> list[str]:
    """Each unguarded POSIX-only name in ``path``, as 'file:line name'."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = _parents(tree)
    found: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner, name = node.value.id, node.attr
            if owner == "os" and (name.startswith("O_") or name in POSIX_OS_NAMES):
                found.append((node, f"os.{name}"))
            elif owner == "signal" and name not in PORTABLE_SIGNAL_NAMES:
                found.append((node, f"signal.{name}"))
            elif owner in POSIX_MODULES:
                found.append((node, f"{owner}.{name}"))
        elif isinstance(node, ast.Import):
            found += [
                (node, f"import {alias.name}")
                for alias in node.names
                if alias.name.split(".")[0] in POSIX_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in POSIX_MODULES:
            found.append((node, f"from {node.module} import"))
        elif isinstance(node, ast.keyword) and node.arg in ("preexec_fn", "start_new_session", "pass_fds"):
            found.append((node, f"{node.arg}="))
    # O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_EXCL, O_TRUNC, O_APPEND exist on Windows too.
    portable = {
        "os.O_RDONLY",
        "os.O_WRONLY",
        "os.O_RDWR",
        "os.O_CREAT",
        "os.O_EXCL",
        "os.O_TRUNC",
        "os.O_APPEND",
    }
    relative = path.relative_to(REPO)
    return [
        f"{relative}:{node.lineno} {what}"
        for node, what in found
        if what not in portable and not _guarded(node, parents)
    ]


def test_product_code_uses_no_posix_only_name_unguarded():
    problems = [use for path in PRODUCT for use in posix_uses(path)]
    assert problems == [], "POSIX-only names used without a platform guard:\n" + "\n".join(problems)


def test_raw_writes_go_to_binary_descriptors():
    # os.open without O_BINARY gives Windows a text-mode descriptor: a raw os.write on it turns b"\n" into
    # b"\r\n" (inside a PNG, say). os.fdopen(fd, "wb") is safe; a module that uses os.write must use O_BINARY.
    offenders = [
        str(path.relative_to(REPO))
        for path in PRODUCT
        if "os.write(" in (text := path.read_text(encoding="utf-8")) and "O_BINARY" not in text
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import os\nos.open('x', os.O_WRONLY | os.O_NOFOLLOW)\n", ["os.O_NOFOLLOW"]),
        ("import os\nos.open('x', os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))\n", []),
        ("import fcntl\n", ["import fcntl"]),
        ("try:\n    import fcntl\nexcept ImportError:\n    fcntl = None\n", []),
        ("import sys\nif sys.platform != 'win32':\n    import termios\n", []),
        ("import signal\nsignal.signal(signal.SIGHUP, print)\n", ["signal.SIGHUP"]),
        ("import signal\nsignal.signal(signal.SIGINT, print)\n", []),
        ("import os\nos.getuid()\n", ["os.getuid"]),
        ("import subprocess\nsubprocess.run(['x'], preexec_fn=print)\n", ["preexec_fn="]),
    ],
)
def test_the_scan_finds_what_it_should(tmp_path, source, expected):
    # The scan itself is checked on samples, so an empty list above means something.
    sample = REPO / ".cache" / "portability-sample.py"
    sample.parent.mkdir(exist_ok=True)
    sample.write_text(source, encoding="utf-8")
    try:
        assert [use.split(" ", 1)[1] for use in posix_uses(sample)] == expected
    finally:
        sample.unlink()
