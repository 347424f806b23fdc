"""The result store on its own: what claim hands out, what survives a restart, what stays private."""

from __future__ import annotations

import os

import pytest

from structure_api.store import RESULT_SUFFIX, ResultStore

from support import TEST_KEY, photo_like, png_bytes

KEY = "a" * 64
OTHER = "b" * 64


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(photo_like(96, 64))


@pytest.mark.parametrize("on_disk", [True, False])
def test_seed_0_result_is_handed_out_once_until_released(tmp_path, image, on_disk):
    store = ResultStore(tmp_path if on_disk else None)
    kept = store.keep(KEY, image, seed=17, format="png", label="node 5, image 1")
    # The keeper holds it; nobody else of this process may claim it meanwhile.
    assert store.claim(KEY, 0) is None
    store.release(kept)  # its batch failed: back in the pool
    claimed = store.claim(KEY, 0)
    assert claimed is not None and claimed.entry_id == kept.entry_id and claimed.data == image
    assert store.claim(KEY, 0) is None  # handed out once
    store.mark_delivered(claimed)
    store.release(claimed)
    assert store.claim(KEY, 0) is None and store.undelivered() == []


def test_fixed_seed_is_served_every_time_and_after_a_restart(tmp_path, image):
    store = ResultStore(tmp_path)
    kept = store.keep(KEY, image, seed=4242, format="png")
    store.mark_delivered(kept)
    for _ in range(3):
        assert store.claim(KEY, 4242).entry_id == kept.entry_id
    restarted = ResultStore(tmp_path)
    found = restarted.claim(KEY, 4242)
    assert found.delivered and found.seed == 4242 and found.data == image
    assert restarted.claim(OTHER, 4242) is None


def test_a_seed_0_result_also_answers_its_seed_fixed(tmp_path, image):
    store = ResultStore(tmp_path)
    kept = store.keep(KEY, image, seed=99, format="png", aliases=(OTHER,))
    store.mark_delivered(kept)
    assert store.claim(OTHER, 99).entry_id == kept.entry_id
    assert store.claim(OTHER, 0) is None  # the alias is for the fixed seed only


def test_undelivered_lists_what_nobody_received_oldest_first(tmp_path, image):
    store = ResultStore(tmp_path)
    first = store.keep(KEY, image, seed=1, format="png", label="out/a.png")
    second = store.keep(OTHER, image, seed=2, format="png", label="out/b.png")
    store.mark_delivered(second)
    listed = ResultStore(tmp_path).undelivered()
    assert [(e.entry_id, e.label, e.delivered) for e in listed] == [(first.entry_id, "out/a.png", False)]


def test_a_result_larger_than_the_limit_is_kept_in_memory(tmp_path, image):
    store = ResultStore(tmp_path, max_bytes=len(image) // 2)
    kept = store.keep(KEY, image, seed=3, format="png")
    assert not store.on_disk(kept) and not store.persistent
    assert not any(p.name.endswith(RESULT_SUFFIX) for p in tmp_path.iterdir())
    store.release(kept)
    assert store.claim(KEY, 0).data == image


def test_store_files_hold_no_key(tmp_path, image):
    store = ResultStore(tmp_path)
    store.keep(KEY, image, seed=5, format="png", label="ComfyUI node 3, image 1 of 1")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(TEST_KEY.encode() not in p.read_bytes() for p in files)


@pytest.mark.posix_only("file modes do not exist on Windows (the user folder's ACL keeps the store private)")
def test_store_files_are_private(tmp_path, image):
    store = ResultStore(tmp_path)
    store.keep(KEY, image, seed=5, format="png", label="ComfyUI node 3, image 1 of 1")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in files if p.name.endswith(RESULT_SUFFIX))


def test_a_damaged_entry_counts_as_absent(tmp_path, image):
    store = ResultStore(tmp_path)
    kept = store.keep(KEY, image, seed=6, format="png")
    store.mark_delivered(kept)
    path = tmp_path / f"{kept.entry_id}{RESULT_SUFFIX}"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert ResultStore(tmp_path).claim(KEY, 6) is None


def test_from_env_hands_one_store_per_folder_to_the_whole_process(tmp_path, monkeypatch):
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", str(tmp_path))
    assert ResultStore.from_env() is ResultStore.from_env()
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", "off")
    off = ResultStore.from_env()
    assert off is ResultStore.from_env() and off.directory is None and not off.persistent
