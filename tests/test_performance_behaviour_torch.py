"""The batch path's concurrency and output slots with torch tensors (tests/test_performance_behaviour.py holds
the torch-free rest, and the same checks on numpy batches, for the Windows lane)."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch
from test_performance_behaviour import AnsweringServer, colour_of, params

from structure_api import pipeline
from structure_api.client import StructureClient
from structure_api.images import encode_upload
from structure_api.pipeline import generate_images
from support import TEST_KEY, photo_like


@pytest.mark.parametrize("concurrency", [1, 3])
def test_requests_in_flight_never_exceed_max_concurrency_and_reach_it(concurrency):
    images = torch.from_numpy(photo_like(64, 64).astype(np.float32) / 255).expand(10, 64, 64, 3)
    with (
        AnsweringServer(delay=lambda seed: 0.05) as server,
        StructureClient(api_key=TEST_KEY, base_url=server.url) as client,
    ):
        generate_images(images, params(), client=client, max_concurrency=concurrency)
    assert server.requests == 10
    assert server.most_in_flight == concurrency


def test_at_most_max_concurrency_encoded_images_exist_at_once(monkeypatch):
    """Requests are built in the workers, one per worker, and let go when that image is done."""
    live: weakref.WeakSet = weakref.WeakSet()
    most = [0]
    lock = threading.Lock()

    def counting_encode_upload(pixels):
        encoded = encode_upload(pixels)
        with lock:
            live.add(encoded)
            most[0] = max(most[0], len(live))
        return encoded

    monkeypatch.setattr(pipeline, "encode_upload", counting_encode_upload)
    images = torch.from_numpy(photo_like(64, 64).astype(np.float32) / 255).expand(12, 64, 64, 3)
    with (
        AnsweringServer(delay=lambda seed: 0.02) as server,
        StructureClient(api_key=TEST_KEY, base_url=server.url) as client,
    ):
        generate_images(images, params(), client=client, max_concurrency=3)
    assert server.requests == 12
    assert 1 <= most[0] <= 3


def test_answers_arriving_out_of_order_land_in_their_own_slot():
    count = 6
    # Seeds are 1..6; the last request is answered first, the first one last.
    with (
        AnsweringServer(delay=lambda seed: 0.04 * (count - seed)) as server,
        StructureClient(api_key=TEST_KEY, base_url=server.url) as client,
    ):
        result = generate_images(
            torch.zeros(count, 40, 48, 3), params(seed=1), client=client, max_concurrency=count
        )
    output = result.images
    assert isinstance(output, torch.Tensor) and output.dtype == torch.float32 and output.is_contiguous()
    assert tuple(output.shape) == (count, 40, 48, 3)
    for index in range(count):
        expected = torch.tensor(colour_of(index + 1), dtype=torch.float32) / 255
        # Exact: a flat lossless PNG decodes to the same levels, and v / 255 is what the pack computes.
        assert torch.equal(output[index], expected.expand(40, 48, 3)), index
