"""The command line's share of "a paid result is never lost", each scenario with its row of the credits table.

What can be checked before paying is refused with nothing sent (paid 0); what fails only after the
answer arrived (a full disk) keeps the result in the store, and the error says how to get it:
``structure-api results --export DIR``, or running the same command again. Everything runs against
the real stand-in on loopback; the full disks are real tmpfs mounts (skipped, and reported as
skipped, where the machine does not allow mounting).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from structure_api.cli import main
from structure_api.files import FolderLock
from structure_api.standin import CREDITS_PER_IMAGE, StandInServer
from structure_api.store import _forget_shared_stores
from support import under_wine

from .probes import CANARY_KEY, image_file_bytes, photo_like
from .test_paid_results import record, small_disk_path, tmpfs

PROMPT = "a harbour at dawn"
# How the system says it (POSIX's strerror; Windows' ERROR_DISK_FULL).
DISK_FULL = re.compile(r"No space left on device|There is not enough space on the disk")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(monkeypatch, service, tmp_path, capsys):
    """``cli(*argv) -> (code, out, err)``: structure-api in process, against the stand-in, with a store on
    disk."""
    monkeypatch.setenv("AITHRIVING_BASE_URL", service.url)
    monkeypatch.setenv("AITHRIVING_API_KEY", CANARY_KEY)
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", str(tmp_path / "store"))
    _forget_shared_stores()

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        assert "Traceback" not in err and CANARY_KEY not in out + err
        return code, out, err

    yield run
    _forget_shared_stores()


def _image(path: Path, seed: int = 0) -> Path:
    path.write_bytes(image_file_bytes(photo_like(96, 80, seed=seed)))
    return path


def _images(folder: Path, count: int) -> Path:
    """A new folder of ``count`` different pictures, img0.png, img1.png, ..."""
    folder.mkdir()
    for i in range(count):
        _image(folder / f"img{i}.png", i)
    return folder


def _fill(folder: Path) -> None:
    """Fill the filesystem of ``folder`` to the last block (ENOSPC)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _one_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1


# --- refused before paying -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["-o SOME_DIR", "-o a_file/out.png", "-o out.gif", "-o out.png --format webp"]
)
def test_generate_refuses_an_output_it_could_not_write_before_paying(case, tmp_path, cli, service, ledger):
    (tmp_path / "SOME_DIR").mkdir()
    (tmp_path / "a_file").write_text("a file")
    source = _image(tmp_path / "in.png")
    _, name, *extra = case.split()
    code, out, err = cli("generate", source, "--prompt", PROMPT, "-o", tmp_path / name, *extra)
    record(
        ledger,
        f"CLI: generate {case}",
        "refused in one line before sending; nothing paid",
        f"exit {code}: {err.strip().replace(str(tmp_path), '…')[:160]}",
        paid=service.credits_spent,
        delivered=0,
        repaid=0,
        requests=len(service.requests),
    )
    assert code == 1 and _one_line(err), err
    assert service.requests == [] and service.credits_spent == 0


def test_batch_with_photo_png_and_photo_jpg_refuses_before_paying(tmp_path, cli, service, ledger):
    folder = tmp_path / "in"
    folder.mkdir()
    _image(folder / "photo.png", 1)
    Image.open(_image(tmp_path / "tmp.png", 2)).save(folder / "photo.jpg")
    code, out, err = cli("batch", folder, "--prompt", PROMPT, "-o", tmp_path / "out")
    record(
        ledger,
        "CLI: batch of photo.png and photo.jpg (one output name)",
        "refused before sending, naming both; nothing paid (before: both paid, one photo.png written)",
        f"exit {code}: {err.strip().replace(str(tmp_path), '…')[:160]}",
        paid=service.credits_spent,
        delivered=0,
        repaid=0,
        requests=len(service.requests),
    )
    assert code == 1 and _one_line(err) and "photo.jpg and photo.png would both be written" in err
    assert service.requests == []


def test_two_batch_runs_on_one_output_folder_pay_once(tmp_path, cli, service, ledger):
    folder = _images(tmp_path / "in", 3)
    outputs = tmp_path / "out"
    outputs.mkdir()
    # The other run, in another process, holds the folder's lock (flock conflicts across open files).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from structure_api.files import FolderLock;"
            "lock = FolderLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)",
            str(outputs),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = cli("batch", folder, "--prompt", PROMPT, "--seed", "4", "-o", outputs)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    refused_paid = service.credits_spent
    code2, out2, err2 = cli("batch", folder, "--prompt", PROMPT, "--seed", "4", "-o", outputs)
    record(
        ledger,
        "CLI: a second batch run on an output folder another run is writing to",
        "refused in one line, nothing sent; once the first is done, each image is paid once",
        f"exit {code}: {err.strip().replace(str(tmp_path), '…')[:120]}; then {out2.strip()}",
        paid=service.credits_spent,
        delivered=3 * CREDITS_PER_IMAGE,
        repaid=refused_paid,
    )
    assert (
        code == 1
        and _one_line(err)
        and f"in use by another structure-api batch run (process {holder.pid})" in err
    )
    assert refused_paid == 0
    assert code2 == 0 and out2.strip() == "done 3, failed 0, skipped 0, credits 18"
    assert not (outputs / FolderLock(outputs).path.name).exists()  # released on exit


# --- failing after paying: a real full disk ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 77])
def test_generate_onto_a_full_disk_keeps_the_result_and_a_rerun_delivers_it_free(
    seed, tmp_path, cli, service, ledger
):
    source = _image(tmp_path / "in.png")
    full = small_disk_path(tmp_path / "full")
    with tmpfs(full, size="64k"):
        _fill(full)
        code, out, err = cli("generate", source, "--prompt", PROMPT, "--seed", seed, "-o", full / "x.png")
    paid = service.credits_spent
    assert code == 1 and _one_line(err), err
    assert DISK_FULL.search(err) and f"paid for ({CREDITS_PER_IMAGE} credits)" in err
    assert "kept in the result store" in err and "`structure-api results --export DIR`" in err
    listed = cli("results")[1]
    assert f"for {full / 'x.png'}" in listed and "1 paid result(s) not delivered" in listed
    # The same command again (the disk has room now) delivers it without paying, seed 0 included.
    code2, out2, err2 = cli("generate", source, "--prompt", PROMPT, "--seed", seed, "-o", full / "x.png")
    record(
        ledger,
        f"CLI: generate onto a full disk (tmpfs), seed {seed}; the same command again",
        "one line: paid, kept, how to get it; the re-run delivers it free",
        f"{err.strip().replace(str(tmp_path), '…')[:150]}…; re-run: "
        f"{out2.strip().replace(str(tmp_path), '…')}",
        paid=paid,
        delivered=CREDITS_PER_IMAGE if code2 == 0 else 0,
        repaid=service.credits_spent - paid,
    )
    assert code2 == 0 and "· 0 credits (kept from an earlier run) ·" in out2, err2
    assert service.credits_spent == paid == CREDITS_PER_IMAGE
    assert Image.open(full / "x.png").size == (96, 80)
    assert "No paid results are waiting" in cli("results")[1]


def test_a_free_standin_result_is_listed_as_free_not_paid(tmp_path, cli, monkeypatch, ledger):
    """`serve` (free) at AITHRIVING_BASE_URL, a result the full disk refused: every sentence says free."""
    source = _image(tmp_path / "in.png")
    full = small_disk_path(tmp_path / "full")
    with StandInServer(api_key=CANARY_KEY, free=True) as serve:
        monkeypatch.setenv("AITHRIVING_BASE_URL", serve.url)
        with tmpfs(full, size="64k"):
            _fill(full)
            code, out, err = cli("generate", source, "--prompt", PROMPT, "--seed", "31", "-o", full / "x.png")
        listed = cli("results")[1]
    shown = err.strip().replace(str(tmp_path), "…")[:110]
    record(
        ledger,
        "CLI against a free `serve` stand-in: generate onto a full disk, then `results`",
        "the error says free and kept; results lists it as free (stand-in), never as paid",
        f"{shown}…; results: {listed.strip().splitlines()[-1][:80]}…",
        paid=0,
        delivered=0,
        repaid=0,
    )
    assert code == 1 and _one_line(err), err
    assert "it was free (a stand-in) and is kept in the result store" in err, err
    assert "paid" not in err
    assert "free (stand-in)" in listed and "1 free result(s) from a stand-in not delivered" in listed, listed
    assert "paid" not in listed, listed


def test_with_the_store_off_a_failure_says_it_is_off(tmp_path, cli, monkeypatch, service, ledger):
    source = _image(tmp_path / "in.png")
    full = small_disk_path(tmp_path / "full")
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", "off")
    with tmpfs(full, size="64k"):
        _fill(full)
        code, out, err = cli("generate", source, "--prompt", PROMPT, "--seed", "32", "-o", full / "x.png")
    record(
        ledger,
        "CLI with AITHRIVING_CACHE_DIR=off: generate onto a full disk",
        "one line: paid, kept in memory only because the store is off (not 'cannot be written')",
        err.strip().replace(str(tmp_path), "…")[:200],
        paid=service.credits_spent,
        delivered=0,
        repaid=0,
    )
    assert code == 1 and _one_line(err), err
    assert "kept in memory only (the result store is off), so it is lost when this command ends" in err, err
    assert "cannot be written" not in err


def test_results_export_writes_what_a_full_disk_refused(tmp_path, cli, service, ledger):
    source = _image(tmp_path / "in.png")
    full = small_disk_path(tmp_path / "full")
    with tmpfs(full, size="64k"):
        _fill(full)
        code, out, err = cli("generate", source, "--prompt", PROMPT, "-o", full / "x.webp")
    assert code == 1 and "kept in the result store" in err
    code, out, err = cli("results", "--export", tmp_path / "rescued")
    exported = sorted((tmp_path / "rescued").iterdir())
    record(
        ledger,
        "CLI: generate onto a full disk, then `structure-api results --export DIR`",
        "the paid result written to DIR under its real format's extension, marked delivered",
        f"{out.strip().splitlines()[-1].replace(str(tmp_path), '…')}; files: {[p.name for p in exported]}",
        paid=service.credits_spent,
        delivered=CREDITS_PER_IMAGE * len(exported),
        repaid=0,
    )
    assert code == 0 and [p.name for p in exported] == ["x.webp"]
    with Image.open(exported[0]) as image:
        assert image.format == "WEBP" and image.size == (96, 80)
    assert "No paid results are waiting" in cli("results")[1]
    assert service.credits_spent == CREDITS_PER_IMAGE


def test_batch_onto_a_full_disk_then_resume_delivers_every_paid_image_free(tmp_path, cli, service, ledger):
    folder = _images(tmp_path / "in", 3)
    outputs = small_disk_path(tmp_path / "out")
    with tmpfs(outputs, size="64k"):
        _fill(outputs)
        code, out, err = cli("batch", folder, "--prompt", PROMPT, "-o", outputs)  # seed 0: random
    paid = service.credits_spent
    assert code == 1 and out.strip() == "done 0, failed 3, skipped 0, credits 18", err
    assert err.count("not written: ") == 3 and err.count("kept in the result store") == 3
    # The mount is gone: the same command resumes into the (now roomy) folder.
    code2, out2, err2 = cli("batch", folder, "--prompt", PROMPT, "-o", outputs)
    record(
        ledger,
        "CLI: batch of 3 (seed 0) onto a full disk (tmpfs); the same command again",
        "3 paid, none written, each named as kept; the re-run writes all 3 from the store, paying nothing",
        f"{out.strip()}; re-run: {out2.strip()}",
        paid=paid,
        delivered=CREDITS_PER_IMAGE * len(list(outputs.glob("*.png"))),
        repaid=service.credits_spent - paid,
    )
    assert code2 == 0 and out2.strip() == "done 3, failed 0, skipped 0, credits 0", err2
    assert sorted(p.name for p in outputs.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert service.credits_spent == paid == 18


# --- Ctrl-C --------------------------------------------------------------------------------------


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT back to its default, so the CLI gets Ctrl-C as in a terminal.

    A test run started as a background job (nohup, `&`, some CI runners) ignores SIGINT, every child
    inherits that, and Python then never turns SIGINT into KeyboardInterrupt: the signal would be lost.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _BatchInATerminal:
    """``structure-api batch`` in a child process against a stand-in, stopped with Ctrl-C as in a terminal.

    Its stderr is read line by line as it comes, so a test times its signals on what the CLI says (a
    progress line, "stopping: ...") rather than on sleeps measured against the stand-in's latency.
    """

    def __init__(self, tmp_path: Path, server: StandInServer, images: int) -> None:
        folder = _images(tmp_path / "in", images)
        self.outputs = tmp_path / "out"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AITHRIVING_")}
        self.env.update(
            AITHRIVING_BASE_URL=server.url,
            AITHRIVING_API_KEY=CANARY_KEY,
            PYTHONPATH=str(REPO),
            AITHRIVING_CACHE_DIR=str(tmp_path / "store"),
        )
        self.argv = [
            sys.executable,
            "-m",
            "structure_api",
            "batch",
            str(folder),
            "-o",
            str(self.outputs),
            "--prompt",
            PROMPT,
            "--seed",
            "9",
            "--concurrency",
            "2",
        ]
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._err: list[str] = []
        self._out = ""

    def __enter__(self) -> _BatchInATerminal:
        if sys.platform == "win32":
            if under_wine():
                pytest.skip(
                    "Not under Wine: Ctrl-Break cannot be sent there (Wine 8's GenerateConsoleCtrlEvent "
                    "fails for a process whose output is a pipe); windows-latest runs this test"
                )
            # Windows' Ctrl-C to another program: Ctrl-Break to the process group it leads.
            how = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            how = {"preexec_fn": _ctrl_c_as_in_a_terminal}
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=REPO,
            **how,
        )
        self._readers = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(target=self._read_out, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self._err.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _read_out(self) -> None:
        self._out = self.proc.stdout.read()

    def wait_for_line(self, wanted: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        """The next stderr line for which wanted() is true; fails if the CLI ends or stays silent first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(
                    f"the CLI did not say {what} within {timeout:.0f} s; it said: {''.join(self._err)}"
                )
            if line is None:
                pytest.fail(f"the CLI ended before saying {what}; it said: {''.join(self._err)}")
            if wanted(line):
                return line

    def press_ctrl_c(self) -> None:
        """Ctrl-C as in a terminal (Ctrl-Break on Windows, which the CLI takes as a Ctrl-C)."""
        self.proc.send_signal(signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGINT)

    def ctrl_c(self) -> None:
        """Ctrl-C, then wait until the CLI says it stopped sending (the signal was handled, not just sent)."""
        self.press_ctrl_c()
        self.wait_for_line(lambda line: line.startswith("stopping: no new requests"), "that it stops sending")

    def finish(self, timeout: float = 60.0) -> tuple[str, str]:
        """Wait for the exit; (stdout, stderr) in full."""
        self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return self._out, "".join(self._err)


def test_ctrl_c_lets_the_requests_in_flight_finish_and_says_what_was_done_and_paid(tmp_path, ledger):
    with StandInServer(api_key=CANARY_KEY, latency=1.0) as server:
        with _BatchInATerminal(tmp_path, server, images=8) as batch:
            # The CLI's progress line says an image is done (and written): Ctrl-C in the middle of the run.
            batch.wait_for_line(
                lambda line: re.search(r"\] [1-7]/8 · ", line) is not None, "that one image is done"
            )
            batch.ctrl_c()
            out, err = batch.finish()
        outputs = batch.outputs
        first_paid = server.credits_spent
        summary = re.search(
            r"interrupted: (\d+) of 8 image\(s\) done and written, (\d+) credits paid for them, (\d+) not "
            r"sent",
            err,
        )
        assert batch.proc.returncode == 130 and summary, err
        done, paid, not_sent = (int(group) for group in summary.groups())
        written = len(list(outputs.glob("*.png")))
        again = subprocess.run(
            batch.argv, capture_output=True, text=True, env=batch.env, cwd=REPO, timeout=120
        )
        record(
            ledger,
            "CLI: Ctrl-C in a batch of 8 (2 at once), then the same command again",
            "the requests in flight finish and are written; the line says done and paid; the re-run pays "
            "only for the images never sent",
            f"{summary.group(0)}; re-run: {again.stdout.strip()}",
            paid=first_paid,
            delivered=CREDITS_PER_IMAGE * len(list(outputs.glob("*.png"))),
            repaid=server.credits_spent - CREDITS_PER_IMAGE * 8,
        )
        assert "Traceback" not in err
        assert done == written and paid == CREDITS_PER_IMAGE * done == first_paid  # nothing paid and dropped
        assert done + not_sent == 8
        assert again.returncode == 0 and f"skipped {done}" in again.stdout
        assert len(list(outputs.glob("*.png"))) == 8 and server.credits_spent == CREDITS_PER_IMAGE * 8


def test_a_second_ctrl_c_drops_the_requests_in_flight_and_says_they_may_be_charged(tmp_path, ledger):
    with StandInServer(api_key=CANARY_KEY, latency=3.0) as server:
        with _BatchInATerminal(tmp_path, server, images=4) as batch:
            deadline = time.monotonic() + 60
            while len(server.requests) < 2 and time.monotonic() < deadline and batch.proc.poll() is None:
                time.sleep(0.05)
            # The second Ctrl-C only once the CLI has handled the first: two signals sent before its
            # handler runs arrive as one, and the run would then wait for the answers instead.
            batch.ctrl_c()
            batch.press_ctrl_c()
            out, err = batch.finish()
        # The stand-in, like the service, finishes (and charges for) what it was already making.
        deadline = time.monotonic() + 10
        while server.credits_spent < 12 and time.monotonic() < deadline:
            time.sleep(0.1)
        charged = server.credits_spent
    record(
        ledger,
        "CLI: Ctrl-C twice in a batch of 4 (2 at once) while 2 answers are being made",
        "the 2 in flight are dropped; the line says 0 done and that those 2 may "
        "have been charged (they were: why the first Ctrl-C lets them finish)",
        next(line for line in err.splitlines() if line.startswith("interrupted:"))[:220],
        paid=charged,
        delivered=0,
        repaid=None,
    )
    assert batch.proc.returncode == 130 and "Traceback" not in err, err
    assert (
        "interrupted: 0 of 4 image(s) done and written, 0 credits paid for them, 2 not sent; 2 request(s) in "
        "flight "
        "were dropped, and the service may have charged for those whose upload had finished" in err
    )
    assert charged == 12 and not list(batch.outputs.glob("*.png"))
