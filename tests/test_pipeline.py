"""The node's logic without ComfyUI: batches, seeds, order, fitting, failures, cancel, result store."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from pipeline_helpers import correlation, distinct_numpy_batch, edges

from structure_api.batch import run_batch
from structure_api.client import StructureRequest
from structure_api.errors import (
    AuthenticationError,
    BatchError,
    ConfigurationError,
    InputError,
    InvalidImageError,
    ServiceError,
)
from structure_api.images import encode_upload
from structure_api.pipeline import StructureParams, batch_seeds, generate_images
from structure_api.standin import Hang, Respond, StandInServer
from structure_api.store import ResultStore
from support import TEST_KEY, photo_like


def distinct_batch(count: int, width: int = 96, height: int = 80) -> torch.Tensor:
    """Each image has its own layout (a square at a different place), so order can be checked."""
    return torch.from_numpy(distinct_numpy_batch(count, width, height))


@pytest.fixture
def client(make_client):
    return make_client()


def params(**overrides) -> StructureParams:
    values = dict(prompt="a castle in the fog", control_strength=0.9, seed=1000)
    values.update(overrides)
    return StructureParams(**values)


def test_batch_seeds_increment_and_wrap_never_zero():
    assert batch_seeds(5, 3) == [5, 6, 7]
    assert batch_seeds(0, 3) == [0, 0, 0]
    assert batch_seeds(4294967293, 4) == [4294967293, 4294967294, 1, 2]


def test_batch_of_8_comes_back_in_order_with_seeds(client, standin):
    images = distinct_batch(8)
    result = generate_images(images, params(seed=1000), client=client, max_concurrency=4)
    assert isinstance(result.images, torch.Tensor)
    assert result.images.shape == (8, 80, 96, 3) and result.images.dtype == torch.float32
    assert result.seeds == list(range(1000, 1008))
    assert sorted(int(r.fields["seed"]) for r in standin.requests) == list(range(1000, 1008))
    assert result.credits == 48
    out = result.images.numpy()
    inputs = images.numpy()
    for i in range(8):
        own = correlation(edges(inputs[i]), edges(out[i]))
        others = [correlation(edges(inputs[j]), edges(out[i])) for j in range(8) if j != i]
        # Each output keeps its own input's edges far better than any other input's: order is kept.
        assert own > 0.5 and own > max(others) + 0.2, (i, own, max(others))


def test_numpy_in_numpy_out_and_single_image(client):
    image = photo_like(128, 96).astype(np.float32)[None] / 255
    result = generate_images(image, params(), client=client)
    assert isinstance(result.images, np.ndarray) and result.images.shape == (1, 96, 128, 3)
    assert 0.0 <= result.images.min() and result.images.max() <= 1.0


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_other_channel_counts_are_accepted(client, standin, channels):
    image = torch.rand(1, 70, 70, channels)
    result = generate_images(image, params(), client=client)
    assert result.images.shape == (1, 70, 70, 3)


@pytest.mark.parametrize("width, height", [(1, 1), (20000, 10), (40, 300), (3100, 3100)])
def test_images_outside_limits_are_fitted_and_restored(client, standin, width, height):
    image = torch.rand(1, height, width, 3)
    result = generate_images(image, params(), client=client)
    assert result.images.shape == (1, height, width, 3)
    sent = standin.requests[-1]
    import io

    from PIL import Image

    w, h = Image.open(io.BytesIO(sent.image_bytes)).size
    assert w >= 64 and h >= 64 and 4096 <= w * h <= 9_437_184 and max(w, h) <= 2.5 * min(w, h)


def test_fail_mode_refuses_before_any_request(client, standin):
    with pytest.raises(InvalidImageError, match="fit"):
        generate_images(torch.rand(2, 32, 32, 3), params(outside_limits="fail"), client=client)
    assert standin.requests == []


@pytest.mark.parametrize(
    "images, words",
    [
        (torch.zeros(0, 64, 64, 3), "empty"),
        (torch.zeros(1, 0, 64, 3), "pixel"),
        (torch.zeros(1, 64, 64, 5), "channels"),
        (torch.zeros(64, 64), "shape"),
    ],
)
def test_bad_batches_name_the_problem(client, standin, images, words):
    with pytest.raises(InvalidImageError, match=words):
        generate_images(images, params(), client=client)
    assert standin.requests == []


@pytest.mark.parametrize(
    "overrides", [{"prompt": " "}, {"seed": -5}, {"control_strength": 2.0}, {"outside_limits": "stretch"}]
)
def test_bad_parameters_fail_before_any_work(client, standin, overrides):
    with pytest.raises(InputError):
        generate_images(distinct_batch(2), params(**overrides), client=client)
    assert standin.requests == []


def test_nan_and_out_of_range_values_are_cleaned(client, standin):
    image = torch.full((1, 64, 64, 3), float("nan"))
    image[0, :32] = 7.0
    image[0, 32:40] = -3.0
    result = generate_images(image, params(), client=client)
    assert torch.isfinite(result.images).all()


def test_failure_names_the_failed_images_and_no_placeholder(client, standin):
    # Every request of image 3 (seed 1002) fails with 400; the others succeed.
    standin.script(Respond(400, body={"code": -1, "message": "image 3 is bad"}))
    with pytest.raises(BatchError) as info:
        generate_images(distinct_batch(4), params(), client=client, max_concurrency=1)
    message = str(info.value)
    assert (
        message.startswith("1 of 4 images failed") and "image 1:" in message and "image 3 is bad" in message
    )
    assert list(info.value.failures) == [0]


def test_single_image_failure_raises_its_own_error(client, standin):
    standin.script(Respond(503), Respond(503), Respond(503), Respond(503), Respond(503))
    with pytest.raises(ServiceError, match="HTTP 503"):
        generate_images(distinct_batch(1), params(), client=client)


def test_auth_failure_stops_sending_the_rest(standin, make_client):
    bad = make_client(api_key="sk-wrong")
    with pytest.raises(BatchError) as info:
        generate_images(distinct_batch(6), params(), client=bad, max_concurrency=1)
    assert len(standin.requests) == 1
    assert isinstance(info.value.failures[0], AuthenticationError)
    assert "not sent" in str(info.value.failures[5])


def test_concurrency_is_bounded_and_used():
    """8 requests against 0.3 s latency: 2 at a time take ~4 rounds, 8 at a time ~1."""
    with StandInServer(api_key=TEST_KEY, latency=0.3) as server:
        from structure_api import StructureClient

        timings = {}
        for concurrency in (2, 8):
            with StructureClient(api_key=TEST_KEY, base_url=server.url) as client:
                started = time.monotonic()
                generate_images(distinct_batch(8), params(), client=client, max_concurrency=concurrency)
                timings[concurrency] = time.monotonic() - started
    assert timings[2] >= 4 * 0.3  # never more than 2 in flight
    assert timings[8] < timings[2] / 2  # and really concurrent when allowed


def test_cancel_returns_within_a_second_with_requests_in_flight(standin, make_client):
    standin.script(*[Hang()] * 4)
    cancel_at = time.monotonic() + 0.3
    started = time.monotonic()
    # keep_in_flight=False drops the requests in flight too (the CLI's second Ctrl-C); the default
    # lets them finish in the background (tests/test_in_flight.py).
    result = generate_images(
        distinct_batch(4),
        params(),
        client=make_client(),
        max_concurrency=4,
        should_cancel=lambda: time.monotonic() > cancel_at,
        keep_in_flight=False,
    )
    assert result.report.cancelled and result.images is None
    assert time.monotonic() - started < 1.3
    # The workers end (their sockets were shut), rather than hang on for the read timeout.
    deadline = time.monotonic() + 1.0
    while any(t.name.startswith("structure") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [t for t in threading.enumerate() if t.name.startswith("structure")]


def test_progress_is_reported_on_the_callers_thread(client):
    seen = []
    caller = threading.get_ident()
    generate_images(
        distinct_batch(3),
        params(),
        client=client,
        on_progress=lambda p: seen.append((threading.get_ident(), p.done, p.total)),
    )
    assert all(ident == caller for ident, _, _ in seen)
    assert (caller, 3, 3) in seen


def test_fixed_seed_result_comes_from_the_store_after_restart(standin, make_client, tmp_path):
    images = distinct_batch(3)
    first = generate_images(images, params(seed=77), client=make_client(), store=ResultStore(tmp_path))
    assert len(standin.requests) == 3 and first.credits == 18
    # A new store object on the same folder stands for a restart.
    second = generate_images(images, params(seed=77), client=make_client(), store=ResultStore(tmp_path))
    assert len(standin.requests) == 3 and second.credits == 0 and second.from_store == 3
    assert torch.equal(first.images, second.images)
    # A changed parameter is a new request.
    generate_images(
        images, params(seed=77, control_strength=0.5), client=make_client(), store=ResultStore(tmp_path)
    )
    assert len(standin.requests) == 6


def test_random_seed_is_never_served_from_the_store(standin, make_client, tmp_path):
    store = ResultStore(tmp_path)
    first = generate_images(distinct_batch(1), params(seed=0), client=make_client(), store=store)
    generate_images(distinct_batch(1), params(seed=0), client=make_client(), store=store)
    assert len(standin.requests) == 2
    # ... but the paid result is kept under the seed it got, so fixing that seed costs nothing.
    again = generate_images(distinct_batch(1), params(seed=first.seeds[0]), client=make_client(), store=store)
    assert len(standin.requests) == 2 and again.credits == 0


def test_store_files_hold_no_key_and_stay_bounded(standin, make_client, tmp_path):
    store = ResultStore(tmp_path, max_bytes=40_000)
    for seed in range(1, 8):
        generate_images(distinct_batch(1), params(seed=seed), client=make_client(), store=store)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert 0 < total <= 40_000
    for path in files:
        assert TEST_KEY.encode() not in path.read_bytes()


def test_result_store_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", "off")
    off = ResultStore.from_env()
    assert off.directory is None and not off.persistent and ResultStore.from_env() is off
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", "/tmp/somewhere")
    assert ResultStore.from_env().directory.as_posix() == "/tmp/somewhere"
    monkeypatch.setenv("AITHRIVING_CACHE_MAX_MB", "lots")
    with pytest.raises(ConfigurationError, match="AITHRIVING_CACHE_MAX_MB"):
        ResultStore.from_env()


def test_run_batch_encodes_lazily_at_most_concurrency_at_once(client):
    live = []
    peak = []
    lock = threading.Lock()
    image = encode_upload(photo_like(64, 64))

    def make_request(index):
        with lock:
            live.append(index)
            peak.append(len(live))
        return StructureRequest(image=image, prompt="p", seed=index + 1)

    def on_result(index, result):
        with lock:
            live.remove(index)

    report = run_batch(client, 12, make_request, on_result=on_result, max_concurrency=3)
    assert report.done == 12 and max(peak) <= 3


def test_progress_callback_raising_aborts_in_flight_requests(standin, make_client):
    """ComfyUI's progress hook raises InterruptProcessingException after a Cancel; that must not hang."""

    class Interrupted(Exception):
        pass

    standin.script(*[Hang()] * 2)
    calls = []

    def hook(progress):
        calls.append(progress)
        if len(calls) >= 2:
            raise Interrupted()

    started = time.monotonic()
    with pytest.raises(Interrupted):
        generate_images(
            distinct_batch(2), params(), client=make_client(), max_concurrency=2, on_progress=hook
        )
    assert time.monotonic() - started < 2.0
