"""The command line's share of "a paid result is never lost", each scenario with its row of the credits table.

What can be checked before paying is refused with nothing sent (paid 0); what fails only after the
answer arrived (a full disk) keeps the result in the store, and the error says how to get it:
``structure-api results --export DIR``, or running the same command again. Everything runs against
the real stand-in on loopback; the full disks are real tmpfs mounts (skipped, and reported as
skipped, where the machine does not allow mounting).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from structure_api.cli import main
from structure_api.files import FolderLock
from structure_api.standin import CREDITS_PER_IMAGE, StandInServer
from structure_api.store import _forget_shared_stores

from .probes import CANARY_KEY, image_file_bytes, photo_like
from .test_paid_results import record, tmpfs

PROMPT = "a harbour at dawn"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(monkeypatch, service, tmp_path, capsys):
    """``cli(*argv) -> (code, out, err)``: structure-api in process, against the stand-in, with a store on disk."""
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

@pytest.mark.parametrize("case", ["-o SOME_DIR", "-o a_file/out.png", "-o out.gif", "-o out.png --format webp"])
def test_generate_refuses_an_output_it_could_not_write_before_paying(case, tmp_path, cli, service, ledger):
    (tmp_path / "SOME_DIR").mkdir()
    (tmp_path / "a_file").write_text("a file")
    source = _image(tmp_path / "in.png")
    _, name, *extra = case.split()
    code, out, err = cli("generate", source, "--prompt", PROMPT, "-o", tmp_path / name, *extra)
    record(ledger, f"CLI: generate {case}", "refused in one line before sending; nothing paid",
           f"exit {code}: {err.strip().replace(str(tmp_path), '…')[:160]}",
           paid=service.credits_spent, delivered=0, repaid=0, requests=len(service.requests))
    assert code == 1 and _one_line(err), err
    assert service.requests == [] and service.credits_spent == 0


def test_batch_with_photo_png_and_photo_jpg_refuses_before_paying(tmp_path, cli, service, ledger):
    folder = tmp_path / "in"
    folder.mkdir()
    _image(folder / "photo.png", 1)
    Image.open(_image(tmp_path / "tmp.png", 2)).save(folder / "photo.jpg")
    code, out, err = cli("batch", folder, "--prompt", PROMPT, "-o", tmp_path / "out")
    record(ledger, "CLI: batch of photo.png and photo.jpg (one output name)",
           "refused before sending, naming both; nothing paid (before: both paid, one photo.png written)",
           f"exit {code}: {err.strip().replace(str(tmp_path), '…')[:160]}",
           paid=service.credits_spent, delivered=0, repaid=0, requests=len(service.requests))
    assert code == 1 and _one_line(err) and "photo.jpg and photo.png would both be written" in err
    assert service.requests == []


def test_two_batch_runs_on_one_output_folder_pay_once(tmp_path, cli, service, ledger):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _image(folder / f"img{i}.png", i)
    outputs = tmp_path / "out"
    outputs.mkdir()
    # The other run, in another process, holds the folder's lock (flock conflicts across open files).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from structure_api.files import FolderLock;"
         "lock = FolderLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)", str(outputs)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = cli("batch", folder, "--prompt", PROMPT, "--seed", "4", "-o", outputs)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    refused_paid = service.credits_spent
    code2, out2, err2 = cli("batch", folder, "--prompt", PROMPT, "--seed", "4", "-o", outputs)
    record(ledger, "CLI: a second batch run on an output folder another run is writing to",
           "refused in one line, nothing sent; once the first is done, each image is paid once",
           f"exit {code}: {err.strip().replace(str(tmp_path), '…')[:120]}; then {out2.strip()}",
           paid=service.credits_spent, delivered=3 * CREDITS_PER_IMAGE, repaid=refused_paid)
    assert code == 1 and _one_line(err) and f"in use by another structure-api batch run (process {holder.pid})" in err
    assert refused_paid == 0
    assert code2 == 0 and out2.strip() == "done 3, failed 0, skipped 0, credits 18"
    assert not (outputs / FolderLock(outputs).path.name).exists()  # released on exit


# --- failing after paying: a real full disk ------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 77])
def test_generate_onto_a_full_disk_keeps_the_result_and_a_rerun_delivers_it_free(seed, tmp_path, cli, service,
                                                                                 ledger):
    source = _image(tmp_path / "in.png")
    full = tmp_path / "full"
    with tmpfs(full, size="64k"):
        _fill(full)
        code, out, err = cli("generate", source, "--prompt", PROMPT, "--seed", seed, "-o", full / "x.png")
    paid = service.credits_spent
    assert code == 1 and _one_line(err), err
    assert "No space left on device" in err and f"paid for ({CREDITS_PER_IMAGE} credits)" in err
    assert "kept in the result store" in err and "`structure-api results --export DIR`" in err
    listed = cli("results")[1]
    assert f"for {full / 'x.png'}" in listed and "1 paid result(s) not delivered" in listed
    # The same command again (the disk has room now) delivers it without paying, seed 0 included.
    code2, out2, err2 = cli("generate", source, "--prompt", PROMPT, "--seed", seed, "-o", full / "x.png")
    record(ledger, f"CLI: generate onto a full disk (tmpfs), seed {seed}; the same command again",
           "one line: paid, kept, how to get it; the re-run delivers it free",
           f"{err.strip().replace(str(tmp_path), '…')[:150]}…; re-run: {out2.strip().replace(str(tmp_path), '…')}",
           paid=paid, delivered=CREDITS_PER_IMAGE if code2 == 0 else 0, repaid=service.credits_spent - paid)
    assert code2 == 0 and "· 0 credits (kept from an earlier run) ·" in out2, err2
    assert service.credits_spent == paid == CREDITS_PER_IMAGE
    assert Image.open(full / "x.png").size == (96, 80)
    assert "No paid results are waiting" in cli("results")[1]


def test_results_export_writes_what_a_full_disk_refused(tmp_path, cli, service, ledger):
    source = _image(tmp_path / "in.png")
    full = tmp_path / "full"
    with tmpfs(full, size="64k"):
        _fill(full)
        code, out, err = cli("generate", source, "--prompt", PROMPT, "-o", full / "x.webp")
    assert code == 1 and "kept in the result store" in err
    code, out, err = cli("results", "--export", tmp_path / "rescued")
    exported = sorted((tmp_path / "rescued").iterdir())
    record(ledger, "CLI: generate onto a full disk, then `structure-api results --export DIR`",
           "the paid result written to DIR under its real format's extension, marked delivered",
           f"{out.strip().splitlines()[-1].replace(str(tmp_path), '…')}; files: {[p.name for p in exported]}",
           paid=service.credits_spent, delivered=CREDITS_PER_IMAGE * len(exported), repaid=0)
    assert code == 0 and [p.name for p in exported] == ["x.webp"]
    with Image.open(exported[0]) as image:
        assert image.format == "WEBP" and image.size == (96, 80)
    assert "No paid results are waiting" in cli("results")[1]
    assert service.credits_spent == CREDITS_PER_IMAGE


def test_batch_onto_a_full_disk_then_resume_delivers_every_paid_image_free(tmp_path, cli, service, ledger):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _image(folder / f"img{i}.png", i)
    outputs = tmp_path / "out"
    with tmpfs(outputs, size="64k"):
        _fill(outputs)
        code, out, err = cli("batch", folder, "--prompt", PROMPT, "-o", outputs)  # seed 0: random
    paid = service.credits_spent
    assert code == 1 and out.strip() == "done 0, failed 3, skipped 0, credits 18", err
    assert err.count("not written: ") == 3 and err.count("kept in the result store") == 3
    # The mount is gone: the same command resumes into the (now roomy) folder.
    code2, out2, err2 = cli("batch", folder, "--prompt", PROMPT, "-o", outputs)
    record(ledger, "CLI: batch of 3 (seed 0) onto a full disk (tmpfs); the same command again",
           "3 paid, none written, each named as kept; the re-run writes all 3 from the store, paying nothing",
           f"{out.strip()}; re-run: {out2.strip()}", paid=paid,
           delivered=CREDITS_PER_IMAGE * len(list(outputs.glob("*.png"))), repaid=service.credits_spent - paid)
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


def test_ctrl_c_lets_the_requests_in_flight_finish_and_says_what_was_done_and_paid(tmp_path, ledger):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(8):
        _image(folder / f"img{i}.png", i)
    outputs = tmp_path / "out"
    with StandInServer(api_key=CANARY_KEY, latency=1.0) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AITHRIVING_")}
        env.update(AITHRIVING_BASE_URL=server.url, AITHRIVING_API_KEY=CANARY_KEY, PYTHONPATH=str(REPO),
                   AITHRIVING_CACHE_DIR=str(tmp_path / "store"))
        argv = [sys.executable, "-m", "structure_api", "batch", str(folder), "-o", str(outputs), "--prompt", PROMPT,
                "--seed", "9", "--concurrency", "2"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                                preexec_fn=_ctrl_c_as_in_a_terminal)
        try:
            deadline = time.monotonic() + 60
            while not list(outputs.glob("*.png")) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        first_paid = server.credits_spent
        summary = re.search(r"interrupted: (\d+) of 8 image\(s\) done and written, (\d+) credits paid for them, (\d+) not sent",
                            err)
        assert proc.returncode == 130 and summary, err
        done, paid, not_sent = (int(group) for group in summary.groups())
        written = len(list(outputs.glob("*.png")))
        again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        record(ledger, "CLI: Ctrl-C in a batch of 8 (2 at once), then the same command again",
               "the requests in flight finish and are written; the line says done and paid; the re-run pays "
               "only for the images never sent",
               f"{summary.group(0)}; re-run: {again.stdout.strip()}", paid=first_paid,
               delivered=CREDITS_PER_IMAGE * len(list(outputs.glob('*.png'))),
               repaid=server.credits_spent - CREDITS_PER_IMAGE * 8)
        assert "Traceback" not in err
        assert done == written and paid == CREDITS_PER_IMAGE * done == first_paid  # nothing paid and dropped
        assert done + not_sent == 8
        assert again.returncode == 0 and f"skipped {done}" in again.stdout
        assert len(list(outputs.glob("*.png"))) == 8 and server.credits_spent == CREDITS_PER_IMAGE * 8


def test_a_second_ctrl_c_drops_the_requests_in_flight_and_says_they_may_be_charged(tmp_path, ledger):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        _image(folder / f"img{i}.png", i)
    outputs = tmp_path / "out"
    with StandInServer(api_key=CANARY_KEY, latency=3.0) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AITHRIVING_")}
        env.update(AITHRIVING_BASE_URL=server.url, AITHRIVING_API_KEY=CANARY_KEY, PYTHONPATH=str(REPO),
                   AITHRIVING_CACHE_DIR=str(tmp_path / "store"))
        argv = [sys.executable, "-m", "structure_api", "batch", str(folder), "-o", str(outputs), "--prompt", PROMPT,
                "--seed", "9", "--concurrency", "2"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                                preexec_fn=_ctrl_c_as_in_a_terminal)
        try:
            deadline = time.monotonic() + 60
            while len(server.requests) < 2 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        # The stand-in, like the service, finishes (and charges for) what it was already making.
        deadline = time.monotonic() + 10
        while server.credits_spent < 12 and time.monotonic() < deadline:
            time.sleep(0.1)
        charged = server.credits_spent
    record(ledger, "CLI: Ctrl-C twice in a batch of 4 (2 at once) while 2 answers are being made",
           "the 2 in flight are dropped; the line says 0 done and that those 2 may "
           "have been charged (they were: why the first Ctrl-C lets them finish)",
           next(line for line in err.splitlines() if line.startswith("interrupted:"))[:220],
           paid=charged, delivered=0, repaid=None)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: 0 of 4 image(s) done and written, 0 credits paid for them, 2 not sent; 2 request(s) in flight " \
           "were dropped, and the service may have charged for those whose upload had finished" in err
    assert charged == 12 and not list(outputs.glob("*.png"))
