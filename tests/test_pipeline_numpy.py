"""The node's logic on numpy IMAGE batches, without torch: so it runs on Windows Python too (the Windows
lane).

tests/test_pipeline.py checks the same path with torch tensors (and the tensor type coming back).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from pipeline_helpers import correlation, distinct_numpy_batch, edges

from structure_api.errors import BatchError, InvalidImageError
from structure_api.pipeline import StructureParams, generate_images
from structure_api.standin import Hang, Respond
from structure_api.store import ResultStore


@pytest.fixture
def client(make_client):
    return make_client()


def params(**overrides) -> StructureParams:
    values = dict(prompt="a castle in the fog", control_strength=0.9, seed=1000)
    values.update(overrides)
    return StructureParams(**values)


def test_numpy_batch_of_6_comes_back_in_order_with_seeds(client, standin):
    images = distinct_numpy_batch(6)
    result = generate_images(images, params(seed=1000), client=client, max_concurrency=3)
    assert isinstance(result.images, np.ndarray)
    assert result.images.shape == (6, 80, 96, 3) and result.images.dtype == np.float32
    assert result.seeds == list(range(1000, 1006)) and result.credits == 36
    assert sorted(int(r.fields["seed"]) for r in standin.requests) == list(range(1000, 1006))
    for i in range(6):
        own = correlation(edges(images[i]), edges(result.images[i]))
        others = [correlation(edges(images[j]), edges(result.images[i])) for j in range(6) if j != i]
        assert own > 0.5 and own > max(others) + 0.2, (i, own, max(others))


def test_numpy_batch_outside_limits_is_fitted_and_restored(client, standin):
    images = np.full((2, 40, 900, 3), 0.5, np.float32)  # 22.5:1, past the service's aspect limit
    result = generate_images(images, params(), client=client)
    assert result.images.shape == (2, 40, 900, 3)
    assert all(len(r.fields) for r in standin.requests) and len(standin.requests) == 2


def test_numpy_nan_and_out_of_range_values_are_cleaned(client):
    image = np.full((1, 64, 64, 3), np.nan, np.float32)
    image[0, :32] = 7.0
    image[0, 32:40] = -3.0
    result = generate_images(image, params(), client=client)
    assert np.isfinite(result.images).all() and 0.0 <= result.images.min() and result.images.max() <= 1.0


@pytest.mark.parametrize(
    "images, words",
    [
        (np.zeros((0, 64, 64, 3), np.float32), "empty"),
        (np.zeros((1, 64, 64, 5), np.float32), "channels"),
        (np.zeros((64, 64), np.float32), "shape"),
    ],
)
def test_numpy_bad_batches_name_the_problem(client, standin, images, words):
    with pytest.raises(InvalidImageError, match=words):
        generate_images(images, params(), client=client)
    assert standin.requests == []


def test_numpy_failure_names_the_failed_image(client, standin):
    standin.script(Respond(400, body={"code": -1, "message": "image 1 is bad"}))
    with pytest.raises(BatchError) as info:
        generate_images(distinct_numpy_batch(3), params(), client=client, max_concurrency=1)
    assert str(info.value).startswith("1 of 3 images failed") and list(info.value.failures) == [0]


def test_numpy_fixed_seed_batch_comes_from_the_store_after_a_restart(standin, make_client, tmp_path):
    images = distinct_numpy_batch(3)
    first = generate_images(images, params(seed=77), client=make_client(), store=ResultStore(tmp_path))
    assert len(standin.requests) == 3 and first.credits == 18
    second = generate_images(images, params(seed=77), client=make_client(), store=ResultStore(tmp_path))
    assert len(standin.requests) == 3 and second.credits == 0 and second.from_store == 3
    assert np.array_equal(first.images, second.images)


def test_numpy_cancel_returns_with_requests_in_flight(standin, make_client):
    standin.script(*[Hang()] * 3)
    cancel_at = time.monotonic() + 0.3
    started = time.monotonic()
    result = generate_images(
        distinct_numpy_batch(3),
        params(),
        client=make_client(),
        max_concurrency=3,
        should_cancel=lambda: time.monotonic() > cancel_at,
    )
    assert result.report.cancelled and result.images is None
    assert time.monotonic() - started < 2.0
