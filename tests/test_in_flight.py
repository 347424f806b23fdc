"""One in-flight limit per process, and a cancel that keeps what the service is already charging for."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from structure_api import StructureClient
from structure_api.batch import InFlightLimit, process_in_flight, run_batch
from structure_api.client import StructureRequest
from structure_api.images import encode_upload
from structure_api.pipeline import StructureParams, generate_images
from structure_api.standin import StandInServer
from structure_api.store import ResultStore
from support import TEST_KEY, photo_like


def batch(count: int, side: int = 64, offset: int = 0) -> np.ndarray:
    """``count`` different images (so each is its own request), as a numpy IMAGE batch (no torch needed)."""
    images = np.stack([photo_like(side, side, seed=offset + i) for i in range(count)])
    return images.astype(np.float32) / 255.0


def params(seed: int) -> StructureParams:
    return StructureParams(prompt="a lighthouse at dusk", control_strength=0.8, seed=seed)


def peak_overlap(server: StandInServer) -> int:
    """The most requests the stand-in was making at once (from reading each request to answering it)."""
    events = []
    for request in server.requests:
        if request.answered_at is not None:
            events += [(request.received_at, 1), (request.answered_at, -1)]
    peak = current = 0
    for _, change in sorted(events):  # an answer at the same instant as an arrival counts first
        current += change
        peak = max(peak, current)
    return peak


@pytest.fixture
def slow_standin():
    with StandInServer(api_key=TEST_KEY, latency=1.5) as server:
        yield server


def cancel_after(seconds: float):
    at = time.monotonic() + seconds
    return lambda: time.monotonic() >= at


@pytest.mark.parametrize("seed", [4100, 0], ids=["fixed seed", "seed 0"])
def test_cancel_after_the_uploads_keeps_their_answers_and_a_rerun_pays_nothing(slow_standin, tmp_path, seed):
    store = ResultStore(tmp_path / "store")
    images = batch(4)
    with StructureClient(api_key=TEST_KEY, base_url=slow_standin.url) as client:
        started = time.monotonic()
        result = generate_images(
            images,
            params(seed),
            client=client,
            store=store,
            max_concurrency=4,
            should_cancel=cancel_after(0.5),
        )
        returned = time.monotonic() - started
        # Control is back within a second of the cancel, the 4 requests still being made.
        assert result.report.cancelled and result.images is None and returned < 1.5, returned
        assert result.report.in_flight == 4 and result.credits == 0
        sentence = result.report.in_flight_sentence(store)
        assert sentence.startswith(
            "4 requests were in flight with the upload complete, so the service may charge "
            "for them; their results are kept in the result store when they arrive"
        )
        assert "queuing the same again gets them free" in sentence
        background = result.report.background
        assert background.wait(10) and background.kept == 4
    assert slow_standin.credits_spent == 24 and len(store.undelivered()) == 4
    # The client was not needed after the answers: a fresh one re-runs the same batch.
    with StructureClient(api_key=TEST_KEY, base_url=slow_standin.url) as client:
        again = generate_images(images, params(seed), client=client, store=store, max_concurrency=4)
    assert again.credits == 0 and again.from_store == 4 and len(slow_standin.requests) == 4
    assert slow_standin.credits_spent == 24 and not store.undelivered()


def test_the_client_a_batch_made_itself_stays_open_for_the_answers_left_in_flight(
    slow_standin, tmp_path, monkeypatch
):
    monkeypatch.setenv("AITHRIVING_API_KEY", TEST_KEY)
    monkeypatch.setenv("AITHRIVING_BASE_URL", slow_standin.url)
    store = ResultStore(tmp_path / "store")
    result = generate_images(batch(2), params(4200), store=store, should_cancel=cancel_after(0.5))
    assert result.report.in_flight == 2
    assert result.report.background.wait(10) and result.report.background.kept == 2
    assert len(store.undelivered()) == 2


def test_cancel_stops_an_upload_that_is_still_going_out_and_says_nothing_is_in_flight(tmp_path):
    # A server that accepts and never reads: the upload fills the socket's buffers and stalls.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    noise = np.random.default_rng(7).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    images = noise[None].astype(np.float32) / 255.0  # a ~3 MB upload
    try:
        with StructureClient(
            api_key=TEST_KEY, base_url=f"http://127.0.0.1:{listener.getsockname()[1]}"
        ) as client:
            started = time.monotonic()
            result = generate_images(
                images,
                params(4300),
                client=client,
                store=ResultStore(tmp_path),
                should_cancel=cancel_after(0.5),
            )
            assert result.report.cancelled and result.report.in_flight == 0
            assert result.report.background is None and result.report.in_flight_sentence() == ""
            assert time.monotonic() - started < 1.5
        deadline = time.monotonic() + 1.0
        while (
            any(t.name.startswith("structure") for t in threading.enumerate()) and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("structure")]
    finally:
        listener.close()
        for connection, _ in accepted:
            connection.close()


def test_two_batches_of_one_process_share_one_in_flight_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("AITHRIVING_MAX_CONCURRENCY", "2")
    limit = process_in_flight()
    limit.peak = 0
    results = {}
    with StandInServer(api_key=TEST_KEY, latency=0.4) as server:

        def node(name: str, offset: int) -> None:
            with StructureClient(api_key=TEST_KEY, base_url=server.url) as client:
                results[name] = generate_images(
                    batch(3, offset=offset),
                    params(4400 + offset),
                    client=client,
                    store=ResultStore(tmp_path / name),
                )

        threads = [
            threading.Thread(target=node, args=(name, offset)) for name, offset in (("a", 0), ("b", 10))
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
        assert len(server.requests) == 6 and all(r.credits == 18 for r in results.values())
        assert peak_overlap(server) == 2 and limit.peak == 2 and limit.in_use == 0
    assert elapsed >= 3 * 0.4  # 6 requests, 2 at a time


def test_a_slot_is_held_from_encoding_to_decoding_so_uploads_stay_bounded(standin):
    limit = InFlightLimit()
    live, peak, lock = [], [], threading.Lock()
    image = encode_upload(photo_like(64, 64))

    def make_request(index: int) -> StructureRequest:
        with lock:
            live.append(index)
            peak.append(len(live))
        return StructureRequest(image=image, prompt="p", seed=index + 1)

    def on_result(index: int, result: object) -> None:
        time.sleep(0.05)
        with lock:
            live.remove(index)

    with StructureClient(api_key=TEST_KEY, base_url=standin.url) as client:
        reports = []
        runs = [
            threading.Thread(
                target=lambda: reports.append(
                    run_batch(
                        client,
                        6,
                        make_request,
                        on_result=on_result,
                        max_concurrency=3,
                        in_flight=limit,
                        store=ResultStore(None),
                    )
                )
            )
            for _ in range(2)
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.join(30)
    assert [report.done for report in reports] == [6, 6], [report.failures for report in reports]
    assert max(peak) <= 3 and limit.peak == 3


def test_stop_sending_delivers_the_requests_in_flight_and_ends_the_pacer_waits_at_once(tmp_path):
    """The CLI's first Ctrl-C: nothing more is sent, and what the service is making still arrives."""
    from structure_api.ratelimit import Pacer, RateLimit

    upload = encode_upload(photo_like(64, 64))
    delivered = []
    with StandInServer(api_key=TEST_KEY, latency=1.0) as server:
        # Two may start in 10 minutes: the third and fourth wait for the pacer.
        with StructureClient(
            api_key=TEST_KEY, base_url=server.url, pacer=Pacer(RateLimit(2, 600.0))
        ) as client:
            started = time.monotonic()
            report = run_batch(
                client,
                4,
                lambda i: StructureRequest(image=upload, prompt="p", seed=i + 1),
                on_result=lambda i, result: delivered.append(i),
                max_concurrency=4,
                store=ResultStore(tmp_path),
                should_stop_sending=cancel_after(0.4),
            )
            took = time.monotonic() - started
        assert len(server.requests) == 2
    assert sorted(delivered) == sorted(report.seeds) and report.done == 2 and report.credits == 12
    assert report.stopped == {0, 1, 2, 3} - set(report.seeds) and not report.failures
    assert not report.cancelled and took < 3.0, took


def test_an_upload_is_stopped_only_while_its_last_byte_is_still_here():
    from structure_api.errors import CancelledError
    from structure_api.transport import UploadBody

    sent = []
    partial = UploadBody([b"abc", b"def"], on_sent=lambda: sent.append("partial"))
    assert partial.read(3) == b"abc"
    assert partial.stop() and partial.stopped
    with pytest.raises(CancelledError, match="nothing was charged"):
        partial.read(3)
    complete = UploadBody([b"abc", b"def"], on_sent=lambda: sent.append("complete"))
    assert complete.read(6) == b"abcdef"  # the last byte is out: the service may make the image
    assert not complete.stop() and not complete.stopped
    assert complete.read(6) == b"" and sent == ["complete"]


def test_a_pooled_connection_does_not_keep_the_upload_it_sent(standin, tmp_path):
    # Each idle connection holding its last upload cost ~6 MB per connection at 2048² (the memory
    # benchmark's 8 in flight went from 239 to 268 MB): once answered, an upload belongs to nobody.
    import gc

    from structure_api.transport import UploadBody

    with StructureClient(api_key=TEST_KEY, base_url=standin.url) as client:
        result = generate_images(
            batch(4), params(4400), client=client, store=ResultStore(tmp_path), max_concurrency=4
        )
        assert result.report.done == 4
        gc.collect()
        assert list(client._transport.connections), "the answered requests' connections stay pooled"
        # type(), not isinstance(): the latter reads __class__ of every object, and some of torch's
        # (when the suite imported it) warn on that read.
        assert [obj for obj in gc.get_objects() if type(obj) is UploadBody] == []
        assert all(connection.upload is None for connection in client._transport.connections)


def test_the_in_flight_sentence_says_truly_where_the_answers_go(tmp_path):
    from structure_api.batch import Background, BatchReport

    report = BatchReport(total=3, cancelled=True, background=Background(3))
    assert "kept in the result store when they arrive" in report.in_flight_sentence(ResultStore(tmp_path))
    assert "kept in memory by this process (the result store is off)" in report.in_flight_sentence(
        ResultStore(None)
    )
    assert report.in_flight_sentence(free=True) == (
        "3 requests in flight to the stand-in finish in the background (free)."
    )
    assert BatchReport(total=3, cancelled=True).in_flight_sentence() == ""


_QUIT_RIGHT_AFTER_A_CANCEL = """
import sys, time
import numpy as np
from structure_api import StructureClient
from structure_api.pipeline import StructureParams, generate_images
from structure_api.store import ResultStore

url, folder = sys.argv[1:3]
images = np.stack([np.full((64, 64, 3), value, np.float32) for value in (0.2, 0.7)])
at = time.monotonic() + 0.5
client = StructureClient(base_url=url)
result = generate_images(
    images, StructureParams(prompt="a lighthouse at dusk", control_strength=0.8, seed=4600), client=client,
    store=ResultStore(folder), max_concurrency=2, should_cancel=lambda: time.monotonic() >= at,
)
print("cancelled with", result.report.in_flight, "in flight", flush=True)
# The script ends here, as ComfyUI does when it is quit right after a Cancel.
"""


def test_quitting_right_after_a_cancel_says_why_it_waits_and_keeps_the_answers(slow_standin, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "AITHRIVING_API_KEY": TEST_KEY}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _QUIT_RIGHT_AFTER_A_CANCEL, slow_standin.url, str(tmp_path / "store")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "cancelled with 2 in flight" in done.stdout
    assert "Waiting for the requests left in flight after a cancel (2 when it was pressed)" in done.stderr
    assert "may charge for them" in done.stderr and TEST_KEY not in done.stderr
    assert took >= 1.5  # it waited for the answers (1.5 s latency) before exiting
    paid = slow_standin.credits_spent
    assert paid == 12
    # The answers reached the store before the process ended: the same batch again pays nothing.
    images = np.stack([np.full((64, 64, 3), value, np.float32) for value in (0.2, 0.7)])
    with StructureClient(api_key=TEST_KEY, base_url=slow_standin.url) as client:
        again = generate_images(images, params(4600), client=client, store=ResultStore(tmp_path / "store"))
    assert again.from_store == 2 and slow_standin.credits_spent == paid
