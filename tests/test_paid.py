"""The paid-result protocol (structure_api.paid) against the stand-in: keep, decode, hand out, deliver."""

from __future__ import annotations

import base64
import threading

import pytest

from structure_api import PaidResult, ResultStore, StructureRequest, fetch_or_pay
from structure_api.answers import ImageAnswer
from structure_api.errors import MalformedResponseError
from structure_api.images import encode_upload
from structure_api.standin import Respond
from support import photo_like, png_bytes


@pytest.fixture(scope="module")
def upload():
    return encode_upload(photo_like(96, 64))


def _request(upload, seed: int = 0) -> StructureRequest:
    return StructureRequest(image=upload, prompt="a paid harbour", seed=seed)


def test_generate_returns_the_checked_undecoded_answer_and_keeps_nothing(make_client, upload):
    answer = make_client().generate(_request(upload, seed=9))
    assert isinstance(answer, ImageAnswer) and answer.seed == 9 and answer.data[:4] == b"\x89PNG"
    assert "pixels" not in vars(answer)  # nothing decoded until asked
    assert answer.pixels.shape == (64, 96, 3)
    with pytest.raises(TypeError, match="fetch_or_pay"):
        make_client().generate(_request(upload), store=ResultStore(None))


def test_a_with_block_delivers_on_success_and_releases_on_error(make_client, standin, upload, tmp_path):
    store = ResultStore(tmp_path)
    with fetch_or_pay(make_client(), _request(upload), store) as paid:
        assert isinstance(paid, PaidResult) and not paid.from_store
        assert paid.result.pixels.shape == (64, 96, 3)
        assert [entry.entry_id for entry in store.undelivered()] == [paid.entry.entry_id]  # kept first
    assert store.undelivered() == []  # delivered
    with pytest.raises(RuntimeError):
        with fetch_or_pay(make_client(), _request(upload), store) as failed:
            raise RuntimeError("the caller could not use it")
    # Released: a re-run of the seed-0 request takes it, free, instead of paying again.
    again = fetch_or_pay(make_client(), _request(upload), store)
    assert again.from_store and again.entry.entry_id == failed.entry.entry_id and again.result.credits == 0
    again.deliver()
    assert len(standin.requests) == 2


def test_seed_0_results_are_handed_out_once_across_threads(make_client, standin, upload, tmp_path):
    store = ResultStore(tmp_path)
    kept = [fetch_or_pay(make_client(), _request(upload), store) for _ in range(3)]
    for paid in kept:
        paid.release()
    got: list[PaidResult] = []
    lock = threading.Lock()

    def take() -> None:
        paid = fetch_or_pay(make_client(), _request(upload), store)
        with lock:
            got.append(paid)

    threads = [threading.Thread(target=take) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    served = [paid.entry.entry_id for paid in got if paid.from_store]
    assert sorted(served) == sorted(paid.entry.entry_id for paid in kept)  # each once
    assert len(standin.requests) == 3 + 2


def test_bytes_that_do_not_decode_are_kept_first_then_discarded(make_client, standin, upload, tmp_path):
    image = png_bytes(photo_like(96, 64))
    middle = len(image) // 2
    broken = (
        image[:middle] + b"\0" * 64 + image[middle + 64 :]
    )  # the header and the end whole, the pixels not
    standin.script(
        Respond(
            200,
            body={
                "code": 0,
                "message": "success",
                "data": {"image": base64.b64encode(broken).decode(), "seed": 5},
            },
        )
    )
    store = ResultStore(tmp_path)
    kept: list[str] = []
    keep = store.keep

    def watching_keep(*args, **kwargs):
        entry = keep(*args, **kwargs)
        kept.append(entry.entry_id)
        return entry

    store.keep = watching_keep  # type: ignore[method-assign]
    with pytest.raises(MalformedResponseError, match="may have charged"):
        fetch_or_pay(make_client(), _request(upload, seed=5), store)
    assert len(kept) == 1  # kept before the decode was tried ...
    assert store.undelivered() == [] and len(standin.requests) == 1  # ... and discarded: never served


def test_the_old_generate_stored_still_works_for_one_release(make_client, upload, tmp_path):
    from structure_api.batch import generate_stored

    with pytest.warns(DeprecationWarning, match="fetch_or_pay"):
        result, from_store = generate_stored(make_client(), _request(upload, seed=3), ResultStore(tmp_path))
    assert result.seed == 3 and not from_store and result.stored is not None
