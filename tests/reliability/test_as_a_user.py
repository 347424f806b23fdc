"""What a user does first, run as a user runs it (``python -m structure_api`` in its own process), on every
platform: on Linux in the main lane, on Windows CPython in the Windows lane (tests/windows/lane.py).

A paid ``generate`` twice (the second from the store), a ``batch`` that leaves nothing in the output
folder but its outputs, ``serve`` on a busy port refused in one line, output through a console code
page that lacks the CLI's signs, and Ctrl-C (Ctrl-Break on Windows) in a batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from structure_api.cli import main
from structure_api.contract import CREDITS_PER_IMAGE
from structure_api.standin import StandInServer
from structure_api.store import _forget_shared_stores

from .probes import CANARY_KEY, image_file_bytes, photo_like
from .test_paid_results import record

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a lighthouse at dusk"


def _env(server: StandInServer, store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITHRIVING_")}
    env.update(
        AITHRIVING_BASE_URL=server.url,
        AITHRIVING_API_KEY=CANARY_KEY,
        AITHRIVING_CACHE_DIR=str(store),
        AITHRIVING_RATE_LIMIT="off",
        PYTHONPATH=str(REPO),
        **extra,
    )
    return env


def _structure_api(*argv: object, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "structure_api", *map(str, argv)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def _picture(path: Path, seed: int = 0) -> Path:
    path.write_bytes(image_file_bytes(photo_like(96, 80, seed=seed)))
    return path


def test_paid_generate_twice_pays_once_and_the_second_comes_from_the_store(tmp_path, ledger):
    source = _picture(tmp_path / "in.png")
    with StandInServer(api_key=CANARY_KEY) as service:
        env = _env(service, tmp_path / "store")
        first = _structure_api(
            "generate", source, "--prompt", PROMPT, "--seed", 31, "-o", tmp_path / "a.png", env=env
        )
        second = _structure_api(
            "generate", source, "--prompt", PROMPT, "--seed", 31, "-o", tmp_path / "b.png", env=env
        )
        paid = service.credits_spent
    record(
        ledger,
        "CLI as a user: paid generate (seed 31), then the same command again to another file",
        "the first pays, the second is served from the result store",
        f"{first.stdout.strip()[:80]}; {second.stdout.strip()[:80]}",
        paid=paid,
        delivered=2 * CREDITS_PER_IMAGE,
        repaid=paid - CREDITS_PER_IMAGE,
    )
    assert first.returncode == 0 and first.stderr == "", first.stderr
    assert second.returncode == 0 and second.stderr == "", second.stderr
    assert (
        f"{CREDITS_PER_IMAGE} credits" in first.stdout
        and "0 credits (kept from an earlier run)" in second.stdout
    )
    assert paid == CREDITS_PER_IMAGE
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_batch_leaves_nothing_in_the_output_folder_but_the_outputs(tmp_path, ledger):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        _picture(inputs / f"photo{i}.png", seed=i)
    outputs = tmp_path / "out"
    with StandInServer(api_key=CANARY_KEY) as service:
        done = _structure_api(
            "batch", inputs, "--prompt", PROMPT, "-o", outputs, env=_env(service, tmp_path / "s")
        )
        paid = service.credits_spent
    names = sorted(path.name for path in outputs.iterdir())
    record(
        ledger,
        "CLI as a user: batch of 3 into a new folder",
        "3 outputs and nothing else (no lock file)",
        f"{done.stdout.strip()}; folder: {names}",
        paid=paid,
        delivered=paid,
        repaid=0,
    )
    assert done.returncode == 0, done.stderr
    assert names == ["photo0.png", "photo1.png", "photo2.png"]
    assert paid == 3 * CREDITS_PER_IMAGE


def test_serve_on_a_busy_port_is_refused_in_one_line(tmp_path):
    with StandInServer() as busy:
        refused = _structure_api("serve", "--port", busy.port, env=_env(busy, tmp_path / "s"), timeout=60)
        still = busy.url
    assert refused.returncode == 1 and refused.stdout == ""
    assert (
        refused.stderr == f"error: Port {busy.port} is already in use; choose another with --port, "
        "or leave --port out to take a free one.\n"
    ), refused.stderr
    assert still.endswith(f":{busy.port}")


@pytest.mark.parametrize("code_page", ["cp932", "cp874", "ascii"])
def test_output_survives_a_console_code_page_without_the_clis_signs(tmp_path, code_page):
    # Redirected on Windows, stdout is encoded with the ANSI code page (cp932 in Japan, cp874 in Thailand):
    # neither has the CLI's '·'. The command must finish and write its file, not die after paying.
    source = _picture(tmp_path / "写真.png")
    with StandInServer(api_key=CANARY_KEY) as service:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "structure_api",
                "generate",
                str(source),
                "--prompt",
                PROMPT,
                "--seed",
                "4",
                "-o",
                str(tmp_path / "出力.png"),
            ],
            capture_output=True,
            env=_env(service, tmp_path / "s", PYTHONIOENCODING=code_page),
            cwd=REPO,
            timeout=120,
        )
        paid = service.credits_spent
    out, err = done.stdout.decode(code_page, "replace"), done.stderr.decode(code_page, "replace")
    assert done.returncode == 0 and err == "", err
    assert out.startswith("seed 4 ") and "credits" in out and (tmp_path / "出力.png").stat().st_size > 0
    assert paid == CREDITS_PER_IMAGE


def test_ctrl_c_in_a_batch_stops_sending_and_keeps_what_was_paid(tmp_path, monkeypatch, capsys, ledger):
    # The CLI's own handler, reached by a real signal: SIGINT, or on Windows SIGBREAK (Ctrl-Break).
    sig = signal.SIGBREAK if sys.platform == "win32" else signal.SIGINT
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        _picture(inputs / f"p{i}.png", seed=i)
    with StandInServer(api_key=CANARY_KEY, latency=0.5) as service:
        for name, value in _env(service, tmp_path / "store").items():
            if name.startswith("AITHRIVING_"):
                monkeypatch.setenv(name, value)
        _forget_shared_stores()

        def press_when_sending() -> None:
            deadline = time.monotonic() + 30
            while not service.requests and time.monotonic() < deadline:
                time.sleep(0.02)
            signal.raise_signal(sig)

        presser = threading.Thread(target=press_when_sending)
        # As in a terminal, whatever this test run inherited (a background job ignores SIGINT).
        inherited = signal.signal(sig, signal.default_int_handler)
        try:
            presser.start()
            code = main(
                [
                    "batch",
                    str(inputs),
                    "--prompt",
                    PROMPT,
                    "--seed",
                    "5",
                    "--concurrency",
                    "1",
                    "-o",
                    str(tmp_path / "out"),
                ]
            )
        finally:
            presser.join()
            signal.signal(sig, inherited)
            _forget_shared_stores()
        paid = service.credits_spent
    err = capsys.readouterr().err
    written = sorted(path.name for path in (tmp_path / "out").glob("*.png"))
    record(
        ledger,
        f"CLI: {signal.Signals(sig).name} in a batch of 6, one at a time",
        "no new requests; the one in flight finishes and is written; the line says what was paid",
        err.strip().splitlines()[-1][:200],
        paid=paid,
        delivered=CREDITS_PER_IMAGE * len(written),
        repaid=0,
    )
    assert code == 130 and "stopping: no new requests" in err and "interrupted: " in err, err
    assert written and paid == CREDITS_PER_IMAGE * len(written) and len(written) < 6
