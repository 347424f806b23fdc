"""A paid result is never lost: every scenario of issue 9 the result store owns, with its credits.

Each test runs real requests over loopback (the stand-in, or a raw socket server for transport
tricks) and writes one row of the credits table: credits *paid* on the first run, credits'
worth of images *delivered* to the caller, and credits *re-paid* on a re-run for images that had
already been paid for. The figure to reach is re-paid 0 wherever an answer arrived.

Filesystems: a read-only store and a full one are real tmpfs mounts (``mount -t tmpfs``, which this
machine allows as root; ``chmod`` would not stop root from writing). Where mounting is refused the
tests that need it are skipped, and the report shows them as skipped, not passed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from structure_api import StructureClient, StructureRequest
from structure_api.errors import BatchError, MalformedResponseError, ResultMayBeBilledError
from structure_api.images import encode_upload
from structure_api.paid import fetch_or_pay
from structure_api.pipeline import StructureParams, generate_images
from structure_api.standin import CREDITS_PER_IMAGE, Drop, Fault, Passthrough, Respond, StandInServer
from structure_api.store import RESULT_SUFFIX, TEMP_PREFIX, ResultStore, _forget_shared_stores
from structure_api.store_disk import hold_key_lock, open_key_lock, release_key_lock

from .probes import CANARY_KEY, b64, image_file_bytes, message_problems, photo_like

PROMPT = "a lighthouse on a cliff"
GENERATION_FAILED = Respond(200, body={"code": -1, "message": "Generation failed, please try again."})
REPO = Path(__file__).resolve().parents[2]


def batch_of(count: int, width: int = 96, height: int = 64) -> np.ndarray:
    return np.stack([photo_like(width, height, seed=300 + i) for i in range(count)]).astype(np.float32) / 255


def record(
    ledger,
    scenario: str,
    expected: str,
    observed: str,
    *,
    paid: int,
    delivered: int,
    repaid: int | None,
    **extra,
) -> None:
    ledger.row(
        "credits", scenario, expected, observed, paid=paid, delivered=delivered, repaid=repaid, **extra
    )


# --- filesystems ---------------------------------------------------------------------------------


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


# Why the tests on a real read-only disk are POSIX only.
READ_ONLY_REASON = (
    "a real read-only disk is a tmpfs remounted read-only; on Windows a folder's read-only "
    "attribute does not stop files being made in it, and a read-only share needs a server"
)
NO_TMPFS = "this machine does not allow mounting a tmpfs, so a real read-only or full disk cannot be made"
# Windows: a real small disk is a drive the Windows lane maps to a tmpfs (tests/windows/lane.py).
SMALL_DRIVE = "AITHRIVING_TEST_SMALL_DRIVE"


def small_disk_path(path: Path) -> Path:
    """Where a test's full disk goes: ``path`` itself (tmpfs mounts it), on Windows a new folder of that name
    on the small drive that SMALL_DRIVE names (a real size-limited disk), where there is one."""
    drive = os.environ.get(SMALL_DRIVE)
    if sys.platform != "win32" or not drive:
        return path
    return Path(drive) / uuid.uuid4().hex / path.name


@contextmanager
def tmpfs(target: Path, size: str = "4m") -> Iterator[Callable[[], None]]:
    """A real tmpfs at ``target``; yields ``make_read_only()`` (a remount, as a read-only share is).

    On Windows ``target`` must come from small_disk_path(): a folder on the small drive (whatever
    ``size`` says); leaving the block empties it, which frees the drive, as the unmount does. It cannot
    be made read-only there.
    """
    if sys.platform == "win32":
        with _on_the_small_drive(target) as make_read_only:
            yield make_read_only
        return
    if not _mount(target, f"size={size},mode=0755"):
        pytest.skip(NO_TMPFS)
    try:

        def make_read_only() -> None:
            done = subprocess.run(["mount", "-o", "remount,ro", str(target)], capture_output=True)
            assert done.returncode == 0, done.stderr

        yield make_read_only
    finally:
        _umount(target)


@contextmanager
def _on_the_small_drive(target: Path) -> Iterator[Callable[[], None]]:
    drive = os.environ.get(SMALL_DRIVE)
    if not drive:
        pytest.skip(
            f"{NO_TMPFS} (on Windows: no small drive named by {SMALL_DRIVE}, which the Windows lane maps)"
        )
    assert Path(drive) in target.parents, (
        f"{target} is not on the small drive: make it with small_disk_path()"
    )
    target.mkdir(parents=True, exist_ok=True)

    def make_read_only() -> None:
        pytest.fail("a folder on Windows cannot be made read-only for its owner (see READ_ONLY_REASON)")

    try:
        yield make_read_only
    finally:
        for item in list(target.iterdir()):  # what the unmount takes away; the folder stays, as a mount point
            shutil.rmtree(item) if item.is_dir() else item.unlink()


# --- the node path: a failed batch, and the re-run ------------------------------------------------


def _fail_image(count: int, failing: int) -> list[Fault]:
    """At concurrency 1 requests arrive in image order: image ``failing`` (1-based) fails, unbilled."""
    return [Passthrough()] * (failing - 1) + [GENERATION_FAILED]


@pytest.mark.parametrize("seed", [0, 4242])
def test_batch_of_8_with_image_7_failing_rerun_pays_only_for_image_7(seed, tmp_path, ledger):
    images = batch_of(8)
    params = StructureParams(prompt=PROMPT, seed=seed)
    store = ResultStore(tmp_path / "store")
    with (
        StandInServer(api_key=CANARY_KEY) as service,
        StructureClient(api_key=CANARY_KEY, base_url=service.url) as client,
    ):
        service.script(*_fail_image(8, 7))
        with pytest.raises(BatchError) as caught:
            generate_images(images, params, client=client, store=store, max_concurrency=1)
        paid = service.credits_spent
        message = str(caught.value)
        undelivered = len(store.undelivered())
        # A restart: a new store object on the same folder.
        again = generate_images(
            images, params, client=client, store=ResultStore(tmp_path / "store"), max_concurrency=1
        )
        repaid = service.credits_spent - paid
    record(
        ledger,
        f"node batch of 8, seed {seed}, image 7 fails; queued again (after a restart)",
        "error names image 7, says 7 paid and kept and that a re-run pays only for the failed one; the "
        "re-run pays for image 7 only",
        f"{message[:160]}...; {undelivered} undelivered in the store; re-run paid {repaid} credits, "
        f"{again.from_store} from the store",
        paid=paid,
        delivered=6 * 8,
        repaid=repaid - CREDITS_PER_IMAGE,
    )
    # The stand-in answers scripted faults in arrival order: at concurrency 1 that is image order, unless a
    # reused connection had to be opened again first; the failed image is read from the error.
    (failed,) = caught.value.failures
    assert paid == 7 * CREDITS_PER_IMAGE and undelivered == 7
    assert message.startswith(f"1 of 8 images failed: image {failed + 1}: The service could not generate")
    assert "7 images were paid for (42 credits); all 7 are kept in the result store" in message
    assert "so queuing again pays only for the failed ones" in message and message_problems(message) == []
    assert repaid == CREDITS_PER_IMAGE and again.from_store == 7 and again.images.shape == (8, 64, 96, 3)
    assert store.undelivered() == [] and ResultStore(tmp_path / "store").undelivered() == []


def test_seed_0_results_are_handed_out_once_then_paid_fresh(tmp_path, ledger):
    images = batch_of(3)
    params = StructureParams(prompt=PROMPT, seed=0)
    store = ResultStore(tmp_path / "store")
    with (
        StandInServer(api_key=CANARY_KEY) as service,
        StructureClient(api_key=CANARY_KEY, base_url=service.url) as client,
    ):
        service.script(*_fail_image(3, 3))
        with pytest.raises(BatchError):
            generate_images(images, params, client=client, store=store, max_concurrency=1)
        second = generate_images(images, params, client=client, store=store, max_concurrency=1)
        third = generate_images(images, params, client=client, store=store, max_concurrency=1)
        credits = service.credits_spent
    record(
        ledger,
        "seed 0: batch of 3 fails on image 3; queued again; then queued a third time",
        "second run delivers the 2 kept images free and pays for 1; the third run (random means random) pays "
        "for 3 fresh images",
        f"second run {second.credits} credits ({second.from_store} from the store); third "
        f"run {third.credits} credits",
        paid=12,
        delivered=18,
        repaid=second.credits - 6,
    )
    assert (second.credits, second.from_store) == (6, 2)
    assert (third.credits, third.from_store) == (18, 0) and credits == 12 + 6 + 18


def test_answers_lost_after_upload_stop_the_batch_and_say_how_many_may_be_charged(tmp_path, ledger):
    images = batch_of(6)
    params = StructureParams(prompt=PROMPT, seed=0)
    store = ResultStore(tmp_path / "store")
    with (
        StandInServer(api_key=CANARY_KEY) as service,
        StructureClient(api_key=CANARY_KEY, base_url=service.url, read_timeout=5) as client,
    ):
        # Image 2's answer is lost after its upload: the stand-in reads it and drops the connection.
        service.script(Passthrough(), Drop())
        with pytest.raises(BatchError) as caught:
            generate_images(images, params, client=client, store=store, max_concurrency=1)
        sent_first = len(service.requests)
        paid = service.credits_spent
        service.clear()
        again = generate_images(images, params, client=client, store=store, max_concurrency=1)
        resent = len(service.requests)
    message = str(caught.value)
    lost = [
        index for index, error in caught.value.failures.items() if isinstance(error, ResultMayBeBilledError)
    ]
    record(
        ledger,
        "batch of 6, seed 0: image 2's answer lost after its upload (connection dropped)",
        "images 3-6 are not sent; the error says 1 request may have been charged; the re-run takes image 1 "
        "from the store",
        f"first run sent {sent_first} requests; re-run sent {resent}, {again.from_store} from the store",
        paid=paid,
        delivered=36,
        repaid=paid - 6 * again.from_store,
    )
    assert len(lost) == 1 and sent_first == lost[0] + 1 and paid == 6 * lost[0]
    assert "1 request may have been charged without an answer arriving" in message
    assert f"{5 - lost[0]} images were not sent" in message and f"image {lost[0] + 2}: not sent" in message
    assert resent == 6 - lost[0] and again.from_store == lost[0]


# --- stores that cannot be written ---------------------------------------------------------------


def _failing_run_then_rerun(
    store_dir: Path, monkeypatch, count: int = 4, seed: int = 0
) -> tuple[str, int, int, int]:
    """Through AITHRIVING_CACHE_DIR (no store passed): a batch failing on its last image, then the same
    again."""
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", str(store_dir))
    images = batch_of(count)
    params = StructureParams(prompt=PROMPT, seed=seed)
    with (
        StandInServer(api_key=CANARY_KEY) as service,
        StructureClient(api_key=CANARY_KEY, base_url=service.url) as client,
    ):
        service.script(*_fail_image(count, count))
        with pytest.raises(BatchError) as caught:
            generate_images(images, params, client=client, max_concurrency=1)
        paid = service.credits_spent
        again = generate_images(images, params, client=client, max_concurrency=1)
        return str(caught.value), paid, service.credits_spent - paid, again.from_store


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("read-only mount", marks=pytest.mark.posix_only(READ_ONLY_REASON)),
        "full disk",
        "a file where the folder should be",
        "limit smaller than one result",
    ],
)
def test_unwritable_store_keeps_results_in_memory_and_says_so(kind, tmp_path, monkeypatch, ledger):
    target = small_disk_path(tmp_path / "store") if kind == "full disk" else tmp_path / "store"
    if kind == "a file where the folder should be":
        target.write_text("not a folder")
        context = None
    elif kind == "limit smaller than one result":
        monkeypatch.setenv("AITHRIVING_CACHE_MAX_MB", "0.001")
        context = None
    else:
        context = tmpfs(target, size="64k")
    if context is not None:
        make_read_only = context.__enter__()
    try:
        if kind == "read-only mount":
            make_read_only()
        elif kind == "full disk":
            fd = os.open(target / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\1" * 4096):
                    pass
            except OSError:
                pass  # ENOSPC: the disk is full
            finally:
                os.close(fd)
        message, paid, repaid, from_store = _failing_run_then_rerun(target, monkeypatch)
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    record(
        ledger,
        f"store cannot be written ({kind}); batch of 4, seed 0, image 4 fails; queued again in the "
        "same process",
        "results kept in memory; the error says so and promises a free re-run only in this "
        "process; the re-run pays for image 4 only",
        f"...{message[message.index('3 images') :][:150]}; re-run paid {repaid}, {from_store} from memory",
        paid=paid,
        delivered=24,
        repaid=repaid - CREDITS_PER_IMAGE,
    )
    assert paid == 18
    # Each reason as it is: a store too small for one result can be written, it has no room.
    reason = (
        "the result is larger than the result store's limit (AITHRIVING_CACHE_MAX_MB)"
        if kind == "limit smaller than one result"
        else "the result store cannot be written"
    )
    assert (
        f"all 3 are kept in memory only, because {reason}, so queuing again in "
        "this same process pays only for the failed ones" in message
    )
    assert repaid == CREDITS_PER_IMAGE and from_store == 3


def test_with_the_store_off_a_failed_batch_says_it_is_off(monkeypatch, ledger):
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", "off")
    _forget_shared_stores()
    images = batch_of(4)
    params = StructureParams(prompt=PROMPT, seed=0)
    with (
        StandInServer(api_key=CANARY_KEY) as service,
        StructureClient(api_key=CANARY_KEY, base_url=service.url) as client,
    ):
        service.script(*_fail_image(4, 4))
        with pytest.raises(BatchError) as caught:
            generate_images(images, params, client=client, max_concurrency=1)
        paid = service.credits_spent
        again = generate_images(images, params, client=client, max_concurrency=1)
        repaid = service.credits_spent - paid
    _forget_shared_stores()
    message = str(caught.value)
    record(
        ledger,
        "AITHRIVING_CACHE_DIR=off; batch of 4, seed 0, image 4 fails; queued again, same process",
        "the error says the store is off (not that it cannot be written); the re-run pays for image 4",
        f"...{message[message.index('3 images') :][:150]}; re-run paid {repaid}, "
        f"{again.from_store} from memory",
        paid=paid,
        delivered=24,
        repaid=repaid - CREDITS_PER_IMAGE,
    )
    assert (
        "all 3 are kept in memory only, because the result store is off, so queuing again in this same "
        "process pays only for the failed ones" in message
    ), message
    assert "cannot be written" not in message
    assert repaid == CREDITS_PER_IMAGE and again.from_store == 3


@pytest.mark.posix_only(READ_ONLY_REASON)
def test_read_only_store_still_serves_what_it_holds(tmp_path, ledger):
    target = tmp_path / "share"
    images = batch_of(4)
    with (
        tmpfs(target) as make_read_only,
        StandInServer(api_key=CANARY_KEY) as service,
        StructureClient(api_key=CANARY_KEY, base_url=service.url) as client,
    ):
        generate_images(
            images,
            StructureParams(prompt=PROMPT, seed=77),
            client=client,
            store=ResultStore(target),
            max_concurrency=1,
        )
        service.script(*_fail_image(4, 4))
        with pytest.raises(BatchError):  # seed 0: 3 paid and kept undelivered, on disk
            generate_images(
                images,
                StructureParams(prompt=PROMPT, seed=0),
                client=client,
                store=ResultStore(target),
                max_concurrency=1,
            )
        paid = service.credits_spent
        make_read_only()
        store = ResultStore(target)  # as another user, or after a restart, on a read-only share
        fixed = generate_images(images, StructureParams(prompt=PROMPT, seed=77), client=client, store=store)
        random_seed = generate_images(
            images, StructureParams(prompt=PROMPT, seed=0), client=client, store=store, max_concurrency=1
        )
        repaid = service.credits_spent - paid
        persistent = store.persistent
    record(
        ledger,
        "read-only store holding 4 fixed-seed results and 3 undelivered seed-0 ones; both batches "
        "queued again",
        "fixed seed: all 4 served free; seed 0: the 3 undelivered served, image 4 paid",
        f"fixed {fixed.credits} credits ({fixed.from_store} from the store); seed 0 {random_seed.credits} "
        f"credits ({random_seed.from_store} from the store); store persistent: {persistent}",
        paid=paid,
        delivered=48,
        repaid=repaid - CREDITS_PER_IMAGE,
    )
    assert paid == 24 + 18 and not persistent
    assert (fixed.credits, fixed.from_store) == (0, 4)
    assert (random_seed.credits, random_seed.from_store) == (6, 3)


# --- transport: deadlines over a raw socket ------------------------------------------------------


class RawServer:
    """A TCP server on loopback that reads one HTTP request per connection and lets ``answer`` write bytes."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.answer = answer
        self.requests = 0
        self.completed = 0  # answers written whole (what a service would bill)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(rest) < length:
                rest += conn.recv(65536)
            self.requests += 1
            try:
                self.answer(conn)
                self.completed += 1
            except OSError:
                pass  # the client hung up: the answer was not delivered


def ok_body(width: int = 96, height: int = 64, seed: object = 5, padding: int = 0) -> bytes:
    image = b64(image_file_bytes(photo_like(width, height, seed=9)))
    body = json.dumps({"code": 0, "message": "success", "data": {"image": image, "seed": seed}}).encode()
    return body + b" " * padding  # JSON allows trailing whitespace: a big answer with a small image


def send_slowly(conn: socket.socket, data: bytes, piece: int, pause: float) -> None:
    for start in range(0, len(data), piece):
        conn.sendall(data[start : start + piece])
        time.sleep(pause)


def _one_request(seed: int = 31) -> StructureRequest:
    return StructureRequest(image=encode_upload(photo_like(96, 64, seed=1)), prompt=PROMPT, seed=seed)


def _generate(url: str, store: ResultStore, read_timeout: float, **kwargs):
    started = time.monotonic()
    with StructureClient(api_key=CANARY_KEY, base_url=url, read_timeout=read_timeout, **kwargs) as client:
        try:
            result = fetch_or_pay(client, _one_request(), store).result
            return result, time.monotonic() - started
        except Exception as error:  # noqa: BLE001 - the outcome is what the test looks at
            return error, time.monotonic() - started


def test_headers_sent_a_byte_at_a_time_end_within_the_read_timeout(tmp_path, ledger):
    def answer(conn: socket.socket) -> None:
        send_slowly(conn, b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 200, piece=1, pause=0.05)

    with RawServer(answer) as server:
        outcome, seconds = _generate(server.url, ResultStore(tmp_path), read_timeout=0.5)
    record(
        ledger,
        "status line and headers sent a byte every 50 ms (read timeout 0.5 s)",
        "ends after ~0.5 s with 'may have charged'; never re-sent",
        f"{type(outcome).__name__} after {seconds:.2f} s: {outcome}",
        paid=0,
        delivered=0,
        repaid=None,
        requests=server.requests,
        seconds=seconds,
    )
    assert (
        isinstance(outcome, ResultMayBeBilledError)
        and "may have" in str(outcome)
        and "charged" in str(outcome)
    )
    assert "No answer came within 0.5 s" in str(outcome)
    assert seconds < 2.0 and server.requests == 1


def test_big_answer_on_a_slow_steady_link_completes_and_is_kept(tmp_path, ledger):
    body = ok_body(padding=300_000)  # ~315 KB at ~100 KiB/s: 3 s, six times the read timeout

    def answer(conn: socket.socket) -> None:
        conn.sendall(
            (
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        send_slowly(conn, body, piece=10_000, pause=0.1)

    store = ResultStore(tmp_path)
    with RawServer(answer) as server:
        outcome, seconds = _generate(server.url, store, read_timeout=0.5)
    record(
        ledger,
        f"{len(body):,}-byte answer arriving steadily at ~100 KiB/s for {seconds:.1f} s (read timeout 0.5 s)",
        "read to the end (the rate stays above 16 KiB/s), kept, delivered",
        f"{type(outcome).__name__}, seed {getattr(outcome, 'seed', '?')}, kept: "
        f"{getattr(outcome, 'stored', None) is not None}",
        paid=6 * server.completed,
        delivered=6,
        repaid=None,
        requests=server.requests,
        seconds=seconds,
    )
    assert not isinstance(outcome, Exception), outcome
    assert outcome.stored is not None and seconds > 2 and server.requests == 1


def test_answer_trickling_below_the_minimum_rate_ends_within_twice_the_read_timeout(tmp_path, ledger):
    body = ok_body()

    def answer(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        send_slowly(conn, body, piece=50, pause=0.05)  # 1 KB/s: ~15 s for the whole answer

    with RawServer(answer) as server:
        outcome, seconds = _generate(server.url, ResultStore(tmp_path), read_timeout=0.5)
    record(
        ledger,
        "answer trickling at 1 KB/s (read timeout 0.5 s)",
        "ends within ~2 x the read timeout, says the image may have been charged; never re-sent",
        f"{type(outcome).__name__} after {seconds:.2f} s: {outcome}",
        paid=0,
        delivered=0,
        repaid=None,
        requests=server.requests,
        seconds=seconds,
    )
    assert isinstance(outcome, ResultMayBeBilledError) and "below the 16 KiB/s" in str(outcome)
    assert "may have charged" in str(outcome) and message_problems(str(outcome)) == []
    assert seconds < 2 * 0.5 + 0.5 and server.requests == 1


def test_answer_shorter_than_its_content_length_says_it_may_have_been_charged(tmp_path, ledger):
    body = ok_body()

    def answer(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body) + 100}\r\n\r\n".encode() + body)
        conn.shutdown(socket.SHUT_WR)

    with RawServer(answer) as server:
        outcome, seconds = _generate(server.url, ResultStore(tmp_path), read_timeout=2)
    record(
        ledger,
        "answer 100 bytes shorter than its Content-Length, then the connection closes",
        "ResultMayBeBilledError naming both sizes; never re-sent",
        f"{type(outcome).__name__}: {outcome}",
        paid=0,
        delivered=0,
        repaid=None,
        requests=server.requests,
        seconds=seconds,
    )
    assert isinstance(outcome, ResultMayBeBilledError) and f"of the {len(body) + 100:,} bytes" in str(outcome)
    assert "may have charged" in str(outcome) and server.requests == 1


# --- odd answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed_value", [None, "12", -5, 1.5, "x"])
def test_cosmetic_seed_deviation_keeps_the_image(seed_value, tmp_path, caplog, ledger):
    body = ok_body(seed=seed_value)

    def answer(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    store = ResultStore(tmp_path)
    with caplog.at_level("INFO", logger="structure_api"), RawServer(answer) as server:
        outcome, _ = _generate(server.url, store, read_timeout=2)
    assert not isinstance(outcome, Exception), outcome
    expected_seed = 12 if seed_value == "12" else 31
    record(
        ledger,
        f'answer with "seed": {json.dumps(seed_value)}',
        "image kept and delivered; the request's seed used and a log line says so",
        f"seed {outcome.seed}, kept {outcome.stored is not None}",
        paid=6,
        delivered=6,
        repaid=None,
        requests=server.requests,
    )
    assert (
        outcome.seed == expected_seed and outcome.stored is not None and outcome.pixels.shape == (64, 96, 3)
    )
    if seed_value != "12":
        assert any("reports the seed as" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "width, height, accepted",
    [(32, 32, False), (96, 40, False), (600, 400, False), (128, 64, True), (64, 64, True)],
)
def test_answer_far_from_the_request_size_is_an_error_near_it_is_resized(width, height, accepted, tmp_path):
    body = ok_body(width=width, height=height)

    def answer(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    with RawServer(answer) as server:
        images = batch_of(1)
        with StructureClient(api_key=CANARY_KEY, base_url=server.url) as client:
            try:
                outcome = generate_images(
                    images, StructureParams(prompt=PROMPT, seed=3), client=client, store=ResultStore(tmp_path)
                )
            except MalformedResponseError as error:
                outcome = error
    if accepted:
        assert not isinstance(outcome, Exception), outcome
        assert tuple(outcome.images.shape) == (1, 64, 96, 3)  # brought back to the input's size
    else:
        assert isinstance(outcome, MalformedResponseError) and f"{width}x{height} image for a 96x64" in str(
            outcome
        )


# --- several processes, one store ------------------------------------------------------------------

_SEND_ONE = """
import sys
import numpy as np
from structure_api import StructureClient
from structure_api.pipeline import StructureParams, generate_images
sys.path.insert(0, sys.argv[3])
from support import photo_like
images = np.stack([photo_like(96, 64, seed=300)]).astype(np.float32) / 255
with StructureClient(api_key=sys.argv[2], base_url=sys.argv[1]) as client:
    result = generate_images(images, StructureParams(prompt="two processes", seed=99), client=client)
print(result.credits)
"""


def test_two_processes_sending_the_same_fixed_seed_request_pay_once(tmp_path, ledger):
    env = {**os.environ, "AITHRIVING_CACHE_DIR": str(tmp_path / "store"), "PYTHONPATH": str(REPO)}
    with StandInServer(api_key=CANARY_KEY, latency=1.0) as service:
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _SEND_ONE, service.url, CANARY_KEY, str(REPO / "tests")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [process.communicate(timeout=60) for process in processes]
        paid = service.credits_spent
    credits = sorted(int(out.strip().splitlines()[-1]) for out, _ in outputs)
    record(
        ledger,
        "two processes send the same fixed-seed request at once, sharing one store",
        "one pays; the other waits on the store's per-key lock and is served the kept result",
        f"credits reported by the processes: {credits}; stand-in charged {paid}",
        paid=paid,
        delivered=12,
        repaid=paid - CREDITS_PER_IMAGE,
        requests=len(service.requests),
    )
    assert all(process.returncode == 0 for process in processes), outputs
    assert credits == [0, 6] and paid == 6 and len(service.requests) == 1


_RERUN_SEED_0 = """
import json
import sys
import numpy as np
from structure_api import StructureClient
from structure_api.pipeline import StructureParams, generate_images
sys.path.insert(0, sys.argv[3])
from support import photo_like
images = np.stack([photo_like(96, 64, seed=300 + i) for i in range(4)]).astype(np.float32) / 255
with StructureClient(api_key=sys.argv[2], base_url=sys.argv[1]) as client:
    result = generate_images(images, StructureParams(prompt="seed zero, twice", seed=0), client=client,
                             max_concurrency=4)
served = [result.report.stored[index].entry_id for index in sorted(result.report.from_store)]
print(json.dumps({"credits": result.credits, "from_store": served}))
"""


def test_two_processes_rerunning_a_failed_seed_0_batch_never_get_the_same_kept_result(tmp_path, ledger):
    folder = tmp_path / "store"
    params = StructureParams(prompt="seed zero, twice", seed=0)
    with (
        StandInServer(api_key=CANARY_KEY) as service,
        StructureClient(api_key=CANARY_KEY, base_url=service.url) as client,
    ):
        service.script(*_fail_image(4, 4))
        with pytest.raises(BatchError):  # images 1-3 paid and kept undelivered, image 4 failed
            generate_images(batch_of(4), params, client=client, store=ResultStore(folder), max_concurrency=1)
        kept = {entry.entry_id for entry in ResultStore(folder).undelivered()}
        assert len(kept) == 3
        env = {**os.environ, "AITHRIVING_CACHE_DIR": str(folder), "PYTHONPATH": str(REPO)}
        # Every paid answer now takes 2 s, so each process holds what it claimed while the other claims.
        service.latency = 2.0
        setup_paid = service.credits_spent
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _RERUN_SEED_0, service.url, CANARY_KEY, str(REPO / "tests")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [process.communicate(timeout=120) for process in processes]
        paid = service.credits_spent - setup_paid
    assert all(process.returncode == 0 for process in processes), outputs
    runs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    served = [entry_id for run in runs for entry_id in run["from_store"]]
    record(
        ledger,
        "two processes re-run the same failed seed-0 batch of 4 at once (3 kept undelivered)",
        "each kept result is handed to one process only (claimed under the store's cross-process lock); "
        "everything else is paid fresh",
        f"from the store: {[len(run['from_store']) for run in runs]} (distinct: {len(set(served))}); "
        f"credits {[run['credits'] for run in runs]}",
        paid=paid,
        delivered=8 * CREDITS_PER_IMAGE,
        repaid=0,
        requests=len(service.requests),
    )
    assert len(served) == len(set(served)) == 3 and set(served) == kept
    assert paid == (8 - 3) * CREDITS_PER_IMAGE == sum(run["credits"] for run in runs)
    assert ResultStore(folder).undelivered() == []


# --- store health ------------------------------------------------------------------------------


def test_store_sweeps_orphans_and_stale_locks_on_every_platform(tmp_path, ledger):
    """The sweep with what every platform can make: crashed temp files, orphan halves, a huge and a damaged
    entry, a stale lock file and one held by a process paying under it right now (msvcrt on Windows)."""
    folder = tmp_path / "store"
    folder.mkdir()
    old = time.time() - 3600
    stale_temp = folder / f"{TEMP_PREFIX}crashed"
    stale_temp.write_bytes(b"half an image")
    os.utime(stale_temp, (old, old))
    fresh_temp = folder / f"{TEMP_PREFIX}being-written"
    fresh_temp.write_bytes(b"a write in progress")
    orphan_marker = folder / "0123456789abcdef0123456789abcdef.delivered"
    orphan_marker.touch()
    legacy_half = folder / ("ab" * 32 + ".img")
    legacy_half.write_bytes(b"old cache half")
    os.utime(legacy_half, (old, old))
    with open(folder / f"{'d' * 32}{RESULT_SUFFIX}", "wb") as huge:  # 200 MB, never read
        huge.truncate(200 * 1024 * 1024)
    (folder / f"{'c' * 32}{RESULT_SUFFIX}").write_bytes(b"AITHRIVING-RESULT-1\n{not json")
    stale_lock, held_lock = folder / ".locks" / ("1" * 64), folder / ".locks" / ("2" * 64)
    holder = open_key_lock(folder, held_lock.name)
    hold_key_lock(holder)  # another process paying under this key right now
    stale_lock.touch()
    for lock in (stale_lock, held_lock):
        os.utime(lock, (time.time() - 3 * 86400,) * 2)

    store = ResultStore(folder)
    started = time.monotonic()
    undelivered = store.undelivered()
    seconds = time.monotonic() - started
    release_key_lock(holder)
    kept = store.keep("9" * 64, image_file_bytes(photo_like(96, 64)), seed=5, format="png")
    record(
        ledger,
        f"store folder ({sys.platform}) with a crashed temp file, orphan halves, a 200 MB file, a "
        "damaged entry and a held lock",
        "orphans swept, odd entries ignored unread, the held lock kept",
        f"listed {len(undelivered)} undelivered in {seconds:.2f} s",
        paid=0,
        delivered=0,
        repaid=None,
        seconds=seconds,
    )
    assert undelivered == []
    assert (
        not stale_temp.exists()
        and fresh_temp.exists()
        and not orphan_marker.exists()
        and not legacy_half.exists()
    )
    assert not stale_lock.exists() and held_lock.exists()
    assert [entry.entry_id for entry in ResultStore(folder).undelivered()] == [kept.entry_id]
    assert seconds < 2


@pytest.mark.posix_only(
    "FIFOs (mkfifo) and flock are POSIX; a symlink needs an administrator on Windows. "
    "test_store_sweeps_orphans_and_stale_locks_on_every_platform is its Windows share"
)
def test_store_sweeps_orphans_and_ignores_what_is_not_a_regular_file(tmp_path, ledger):
    folder = tmp_path / "store"
    folder.mkdir()
    old = time.time() - 3600
    stale_temp = folder / f"{TEMP_PREFIX}crashed"
    stale_temp.write_bytes(b"half an image")
    os.utime(stale_temp, (old, old))
    fresh_temp = folder / f"{TEMP_PREFIX}being-written"
    fresh_temp.write_bytes(b"a write in progress")
    orphan_marker = folder / "0123456789abcdef0123456789abcdef.delivered"
    orphan_marker.touch()
    legacy_half = folder / ("ab" * 32 + ".img")
    legacy_half.write_bytes(b"old cache half")
    os.utime(legacy_half, (old, old))
    os.mkfifo(folder / f"{'f' * 32}{RESULT_SUFFIX}")  # reading it would block forever
    os.symlink("/etc/passwd", folder / f"{'e' * 32}{RESULT_SUFFIX}")
    with open(folder / f"{'d' * 32}{RESULT_SUFFIX}", "wb") as huge:  # sparse: 200 MB, never read
        huge.truncate(200 * 1024 * 1024)
    (folder / f"{'c' * 32}{RESULT_SUFFIX}").write_bytes(b"AITHRIVING-RESULT-1\n{not json")

    locks = folder / ".locks"
    locks.mkdir()
    stale_lock, held_lock = locks / ("1" * 64), locks / ("2" * 64)
    for lock in (stale_lock, held_lock):
        lock.touch()
        os.utime(lock, (time.time() - 3 * 86400,) * 2)
    import fcntl

    holder = os.open(held_lock, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process paying under this key right now

    store = ResultStore(folder)
    started = time.monotonic()
    undelivered = store.undelivered()
    os.close(holder)
    seconds = time.monotonic() - started
    kept = store.keep("9" * 64, image_file_bytes(photo_like(96, 64)), seed=5, format="png")
    names = sorted(p.name for p in folder.iterdir())
    record(
        ledger,
        "store folder with a crashed temp file, orphan halves, a FIFO, a symlink, a 200 MB file and a "
        "damaged entry",
        "orphans swept, odd entries ignored unread, new results kept",
        f"listed {len(undelivered)} undelivered in {seconds:.2f} s; left: {', '.join(n[:12] for n in names)}",
        paid=0,
        delivered=0,
        repaid=None,
        seconds=seconds,
    )
    assert undelivered == []
    assert (
        not stale_temp.exists()
        and fresh_temp.exists()
        and not orphan_marker.exists()
        and not legacy_half.exists()
    )
    assert not stale_lock.exists() and held_lock.exists()
    assert [entry.entry_id for entry in ResultStore(folder).undelivered()] == [kept.entry_id]
    assert seconds < 2


def test_old_layout_entries_keep_serving_fixed_seed_requests(tmp_path):
    """Results kept in the two-file layout (``<key>.img`` + ``<key>.json``) move into the store and stay
    free."""
    import hashlib

    from structure_api.store import request_key

    request = _one_request(seed=8)
    data = image_file_bytes(photo_like(96, 64, seed=2))
    with (
        StandInServer(api_key=CANARY_KEY) as service,
        StructureClient(api_key=CANARY_KEY, base_url=service.url) as client,
    ):
        key = request_key(request.image.data, request.form_fields(), client.endpoint)
        folder = tmp_path / "cache"
        folder.mkdir()
        (folder / f"{key}.img").write_bytes(data)
        (folder / f"{key}.json").write_text(
            json.dumps(
                {"seed": 8, "format": "png", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        )
        paid = fetch_or_pay(client, request, ResultStore(folder))
        result, from_store = paid.result, paid.from_store
        assert from_store and result.data == data and service.requests == []
    assert not (folder / f"{key}.img").exists()
