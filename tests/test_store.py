"""The result store on its own: what claim hands out, what survives a restart, what stays private."""

from __future__ import annotations

import dataclasses
import os

import pytest

from structure_api import contract
from structure_api.images import EncodedImage, ImageSize
from structure_api.request import StructureRequest
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


# --- the key: what identifies a request ------------------------------------------------------

_ENDPOINT = "https://www.aithriving.com/api/control/structure"
_PINNED_IMAGE = EncodedImage(
    data=b"\x89PNG fixed bytes", format="png", mime_type="image/png", size=ImageSize(width=96, height=64)
)
# Keys computed by the release before this one: results users keep on disk were stored under them.
_PINNED_KEYS = [
    (dict(prompt="a red barn", seed=42), "497e216f43fb635e38eb234c409114a7e1791a0e11e67cc6b3c1df1e054b411b"),
    (dict(prompt="a red barn", seed=0), "f7381edaee95f44e42e830087c2169fbec273f71311f5da42c5dd5be171d1067"),
    (
        dict(prompt="a red barn", seed=7, control_strength=0.5, negative_prompt="blur", output_format="webp"),
        "1caec73115efe61af7472ff48c13b21faf5d7f5677d36d5c3d1af88d0410f82d",
    ),
]


@pytest.mark.parametrize("fields, key", _PINNED_KEYS)
def test_todays_fields_keep_todays_keys(fields, key) -> None:
    assert ResultStore(None).key_for(StructureRequest(image=_PINNED_IMAGE, **fields), _ENDPOINT) == key


def test_a_new_optional_field_at_its_default_leaves_the_keys_alone(monkeypatch) -> None:
    """A trial field added to the contract: at its default, every key stays; set, it changes the key."""
    trial = contract.FormField("style_preset", "choice", False, "none", choices=("none", "sketch"))
    monkeypatch.setattr(contract, "FORM_FIELDS", contract.FORM_FIELDS + (trial,))

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class TrialRequest(StructureRequest):
        style_preset: str = "none"

    store = ResultStore(None)
    for fields, key in _PINNED_KEYS:
        assert store.key_for(TrialRequest(image=_PINNED_IMAGE, **fields), _ENDPOINT) == key
        # The form does send the new field: only the key leaves it out at its default.
        assert ("style_preset", "none") in TrialRequest(image=_PINNED_IMAGE, **fields).form_fields()
        changed = store.key_for(TrialRequest(image=_PINNED_IMAGE, style_preset="sketch", **fields), _ENDPOINT)
        assert changed != key
