"""The user's image files: inputs read as pixels (orientation applied, metadata left behind), outputs written
atomically.

Everything a command can check about its files is checked here before anything is sent,
because after the service answers, the result has already been paid for.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from .errors import InputError, InvalidImageError, StructureError
from .images import (
    EncodedImage,
    FitPlan,
    ImageSize,
    decode_image,
    detect_format,
    encode_image,
    encode_upload,
    fit_to_limits,
    restore_from_fit,
)

# The user's own files: large camera photos are fine (they are fitted), decompression bombs are not.
MAX_INPUT_PIXELS = 150_000_000
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
FORMAT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
LOCK_FILE_NAME = ".structure-api-batch.lock"
_EXIF_ORIENTATION = 0x0112
# What each EXIF orientation needs to stand upright, as ImageOps.exif_transpose (and so
# ComfyUI's LoadImage) applies it.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class FileAccessError(StructureError):
    """A file or folder of the user's could not be read, created or written."""


class FolderInUseError(StructureError):
    """Another ``structure-api batch`` run is writing to the same output folder."""


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


# --- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputImage:
    """An input file as it will be sent: upright pixels, re-encoded, and the plan to bring the result back."""

    path: Path
    size: ImageSize  # upright, as the user sees the photo
    upload: EncodedImage
    plan: FitPlan


def read_input_image(path: Path) -> InputImage:
    """Read an image file for upload: EXIF orientation applied, pixels re-encoded so no metadata travels."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FileAccessError(f"Cannot read {path}: {_reason(error)}.") from None
    try:
        pixels = decode_image(data, max_pixels=MAX_INPUT_PIXELS)
    except StructureError:
        raise InvalidImageError(
            f"{path} is not an image this tool can read (PNG, JPEG or WebP of at most "
            f"{MAX_INPUT_PIXELS // 1_000_000} megapixels)."
        ) from None
    pixels = _upright(pixels, _exif_orientation(data))
    fitted, plan = fit_to_limits(pixels)
    # Always the decoded pixels, never the file: a camera file carries EXIF (GPS position,
    # camera serial), comments and thumbnails that the service has no business receiving.
    return InputImage(path=path, size=ImageSize.of(pixels), upload=encode_upload(fitted), plan=plan)


def _exif_orientation(data: bytes) -> int:
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: no pixels are decoded
            return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block only means "no orientation"
        return 1


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    method = _UPRIGHT.get(orientation)
    if method is None:
        return pixels
    return np.asarray(Image.fromarray(pixels).transpose(method))


def list_input_images(folder: Path) -> list[Path]:
    """List the image files of a folder (by extension), sorted by name."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.")
    try:
        inputs = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIX_FORMATS and p.is_file())
    except OSError as error:
        raise FileAccessError(f"Cannot list {folder}: {_reason(error)}.") from None
    if not inputs:
        raise InputError(f"{folder} holds no .png, .jpg or .webp images.")
    return inputs


# --- outputs -----------------------------------------------------------------------------


def check_output_file(path: Path, requested_format: str | None) -> str:
    """Return the output file's format, after refusing a path that is a folder, whose extension disagrees with
    ``requested_format`` or is not an image's, or whose folder cannot be created or written."""
    if path.is_dir():
        raise InputError(f"The output {path} is a folder; give a file name, such as {path / 'result.png'}.")
    output_format = output_format_for(path, requested_format)
    check_writable_folder(path.parent)
    return output_format


def output_format_for(path: Path, requested: str | None) -> str:
    """Choose an output file's format: its extension decides; ``requested``, if given, must agree."""
    suffix = path.suffix.lower()
    found = SUFFIX_FORMATS.get(suffix)
    if found is None:
        wanted = FORMAT_SUFFIXES[requested] if requested else ".png, .jpg or .webp"
        problem = "it has none" if not suffix else f"{suffix} is not an image format this tool writes"
        raise InputError(f"The output {path} needs the extension {wanted}; {problem}.")
    if requested and requested != found:
        raise InputError(
            f"The output {path} has the extension {suffix} but --format is {requested}; "
            f"name it {path.stem}{FORMAT_SUFFIXES[requested]} or leave out --format."
        )
    return found


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made in it."""
    for parent in [folder, *folder.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise FileAccessError(f"Cannot create the folder {folder}: {parent} is a file, not a folder.")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FileAccessError(f"Cannot create the folder {folder}: {_reason(error)}.") from None
    # Permission bits say little (root, ACLs, read-only mounts): making a file is the proof.
    probe = folder / f".structure-api-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise FileAccessError(f"Cannot write into the folder {folder}: {_reason(error)}.") from None


def batch_outputs(
    inputs: Sequence[Path], input_dir: Path, output_dir: Path, output_format: str
) -> list[Path]:
    """Map each input to its output file; refuse, before any request, two inputs that would share one."""
    if output_dir.resolve() == input_dir.resolve():
        raise InputError(
            f"The output folder is the input folder ({input_dir}); the results would be taken "
            "for inputs on the next run. Choose another output folder."
        )
    suffix = FORMAT_SUFFIXES[output_format]
    targets = [output_dir / (source.stem + suffix) for source in inputs]
    # Compared without case: on macOS and Windows photo.PNG and photo.png are one file.
    first_source: dict[str, Path] = {}
    for source, target in zip(inputs, targets, strict=True):
        earlier = first_source.setdefault(target.name.lower(), source)
        if earlier is not source:
            raise InputError(
                f"{earlier.name} and {source.name} would both be written to {target}; "
                "rename one of them or move it to another folder (nothing was sent)."
            )
        if target.is_dir():
            raise InputError(f"The output {target} is a folder; move it away (nothing was sent).")
    return targets


def result_file_bytes(
    result_pixels: np.ndarray, result_data: bytes, image: InputImage, output_format: str
) -> bytes:
    """Return the output file's bytes: the service's own when they already fit, else restored and encoded."""
    if (
        not image.plan.changed
        and ImageSize.of(result_pixels) == image.size
        and detect_format(result_data) == output_format
    ):
        return result_data
    # Never the service's bytes under another format's extension, nor at another size.
    return encode_image(restore_from_fit(result_pixels, image.plan), output_format)


def write_atomically(
    path: Path,
    data: bytes | Sequence[bytes],
    *,
    private: bool = False,
    temp_prefix: str | None = None,
    sync_folder: bool = False,
    replace: bool = True,
) -> None:
    """Write ``data`` (bytes, or pieces written in order) to ``path`` through a temp file, fsync and a rename.

    A reader sees the old file or the whole new one, never a half. The file follows the umask, as
    any program's files do, unless ``private``: then it is 0600 from its first byte. ``temp_prefix``
    names the temp file for a sweeper that removes what a crash left; ``sync_folder`` also makes
    the rename itself durable. ``replace=False`` never replaces a file at ``path``: FileExistsError
    (the temp file is hard-linked into place, which fails when the name is taken).
    """
    tmp = path.parent / f"{temp_prefix or '.' + path.name + '.'}{secrets.token_hex(8)}.part"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600 if private else 0o666
    )
    try:
        if private and hasattr(os, "fchmod"):  # POSIX; Windows has no such modes
            os.fchmod(fd, 0o600)  # whatever the umask, never more and never less
        with os.fdopen(fd, "wb", buffering=0) as handle:
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                view = memoryview(piece)
                while view:  # a raw write may be short
                    view = view[handle.write(view) :]
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_folder:
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not possible everywhere (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- one batch run per output folder -----------------------------------------------------


class FolderLock:
    """An exclusive lock on an output folder for one batch run, released on exit (or when it dies)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE_NAME
        self._handle: IO[bytes] | None = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise FolderInUseError at once; never waits."""
        for _ in range(10):
            try:
                handle = open(self.path, "a+b", buffering=0)  # unbuffered: nothing left to fail at close
            except OSError as error:
                raise FileAccessError(f"Cannot create {self.path}: {_reason(error)}.") from None
            if not _try_lock(handle):
                handle.seek(0)
                holder = handle.read(32).decode("ascii", "replace").strip()
                handle.close()
                who = f" (process {holder})" if holder.isdigit() else ""
                raise FolderInUseError(
                    f"{self.folder} is in use by another structure-api batch run{who}; "
                    "wait for it to finish or choose another output folder."
                )
            if _same_file(handle, self.path):
                break
            # The run before removed the file between our open and our lock: lock the new one.
            handle.close()
        else:
            raise FolderInUseError(f"{self.folder} is in use by other structure-api batch runs; try again.")
        try:  # who holds it, for the refusal's message; a full disk only loses that detail
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()).encode())
            handle.flush()
        except OSError:
            pass
        self._handle = handle
        return self

    def release(self) -> None:
        """Remove the lock file and let go of the lock (a run that opened the old file retries)."""
        if self._handle is None:
            return
        if sys.platform == "win32":
            # Windows refuses to remove an open file: unlock and close first. A run that opened the file
            # meanwhile keeps it (the removal then fails), takes the lock and removes the file when done.
            _close_quietly(self._handle, unlock=True)
            _unlink_quietly(self.path)
        else:
            _unlink_quietly(self.path)  # before closing: no other run can lock a file that stays behind
            _close_quietly(self._handle, unlock=False)  # closing the file drops the lock
        self._handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(handle: IO[bytes], path: Path) -> bool:
    try:
        held, named = os.fstat(handle.fileno()), os.stat(path)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


# Windows locks byte ranges, and a locked range cannot be read by anyone else: the lock is on a byte far
# past the process id written at the start, which a refused run reads for its message.
_WINDOWS_LOCK_OFFSET = 1 << 30


def _try_lock(handle: IO[bytes]) -> bool:
    try:
        if sys.platform == "win32":
            import msvcrt

            handle.seek(_WINDOWS_LOCK_OFFSET)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _close_quietly(handle: IO[bytes], *, unlock: bool) -> None:
    try:
        if unlock and sys.platform == "win32":
            import msvcrt

            handle.seek(_WINDOWS_LOCK_OFFSET)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    except OSError:
        pass
    try:
        handle.close()
    except OSError:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def is_finished_output(path: Path) -> bool:
    """Tell whether a batch's output exists and is not empty: that input is done."""
    return path.is_file() and path.stat().st_size > 0


def export_path(folder: Path, *, label: str, format: str, entry_id: str, taken: set[str]) -> Path:
    """Name an exported result's file: its intended output's name, with the extension of its real format."""
    stem = re.sub(r"[^\w.-]+", "_", Path(label).stem).strip("._")[:80] if label else ""
    suffix = FORMAT_SUFFIXES.get(format, "." + format)
    name = f"{stem or 'result'}{suffix}"
    if name.lower() in taken or (folder / name).exists():
        name = f"{stem or 'result'}-{entry_id[:8]}{suffix}"
    taken.add(name.lower())
    return folder / name
