"""structure_api/files.py on a real filesystem: the one atomic writer, the folder lock, output naming."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from structure_api.errors import InputError
from structure_api.files import (
    FolderInUseError,
    FolderLock,
    batch_outputs,
    output_format_for,
    write_atomically,
)


def test_write_atomically_pieces_in_order(tmp_path):
    write_atomically(tmp_path / "public.bin", (b"head\n", memoryview(b"body")))
    write_atomically(tmp_path / "private.bin", b"secret\r\n", private=True)
    assert (tmp_path / "public.bin").read_bytes() == b"head\nbody"  # never b"\r\n" on Windows
    assert (tmp_path / "private.bin").read_bytes() == b"secret\r\n"


@pytest.mark.posix_only(
    "file modes and the umask do not exist on Windows (the user folder's ACL protects files)"
)
def test_write_atomically_umask_or_private(tmp_path):
    previous = os.umask(0)
    try:
        write_atomically(tmp_path / "public.bin", (b"head\n", memoryview(b"body")))
        write_atomically(tmp_path / "private.bin", b"secret", private=True)
    finally:
        os.umask(previous)
    assert (tmp_path / "public.bin").read_bytes() == b"head\nbody"
    assert (tmp_path / "public.bin").stat().st_mode & 0o777 == 0o666  # umask 0: what any program would make
    assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_neither_a_temp_file_nor_a_half_target(tmp_path):
    (tmp_path / "taken").mkdir()  # the rename onto a folder fails after the data was written
    with pytest.raises(OSError):
        write_atomically(tmp_path / "taken", b"data", temp_prefix=".tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_write_atomically_without_replace_never_touches_a_file_that_is_there(tmp_path):
    write_atomically(tmp_path / "new.png", b"first", replace=False)
    assert (tmp_path / "new.png").read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        write_atomically(tmp_path / "new.png", b"second", replace=False)
    assert (tmp_path / "new.png").read_bytes() == b"first"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new.png"]  # no temp file left


def test_folder_lock_is_exclusive_released_and_removed(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(FolderInUseError) as refused:
            FolderLock(tmp_path).acquire()
        assert f"(process {os.getpid()})" in str(refused.value)
    assert list(tmp_path.iterdir()) == []
    with FolderLock(tmp_path):  # free again
        pass


@pytest.mark.parametrize(
    "name, requested, expected",
    [
        ("a.png", None, "png"),
        ("a.JPG", None, "jpeg"),
        ("a.jpeg", "jpeg", "jpeg"),
        ("a.webp", None, "webp"),
        ("a.png", "webp", InputError),
        ("a.gif", None, InputError),
        ("a", "png", InputError),
    ],
)
def test_output_format_comes_from_the_extension_and_must_agree(name, requested, expected):
    if expected is InputError:
        with pytest.raises(InputError):
            output_format_for(Path(name), requested)
    else:
        assert output_format_for(Path(name), requested) == expected


def test_batch_outputs_refuse_names_that_differ_only_in_case_or_extension(tmp_path):
    inputs = [tmp_path / "in" / name for name in ("Photo.png", "photo.JPG")]
    with pytest.raises(InputError, match="Photo.png and photo.JPG would both be written"):
        batch_outputs(inputs, tmp_path / "in", tmp_path / "out", "png")
    assert batch_outputs(inputs[:1], tmp_path / "in", tmp_path / "out", "webp") == [
        tmp_path / "out" / "Photo.webp"
    ]
