"""Real round-trips through structure_api.images: arrays, fitting, PNG/JPEG bytes, hostile answers.

Torch-free, so the Windows lane runs it; tests/test_images_torch.py holds the tensor cases.
"""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

from structure_api.errors import InvalidImageError, MalformedResponseError
from structure_api.images import (
    MAX_ASPECT,
    MAX_PIXELS,
    MAX_REQUEST_BYTES,
    MIN_PIXELS,
    MIN_SIDE,
    EncodedImage,
    FitPlan,
    ImageSize,
    as_numpy,
    decode_base64,
    decode_image,
    detect_format,
    encode_png,
    encode_upload,
    fit_to_limits,
    new_output_batch,
    plan_fit,
    restore_from_fit,
    to_uint8_rgb,
    uint8_to_float,
)

# --- batch and base64 helpers the product no longer needs; kept here with the tests that pin them --


def batch_size(images) -> int:
    """Number of images in a ``[B, H, W, C]`` batch; a ``[H, W, C]`` image counts as a batch of 1."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) == 3:
        return 1
    if len(shape) != 4:
        raise InvalidImageError(
            f"Expected an image batch shaped [batch, height, width, channels]; got shape {list(shape)}."
        )
    if shape[0] == 0:
        raise InvalidImageError("The image batch is empty; it needs at least one image.")
    return int(shape[0])


def batch_item(images, index: int):
    """Image ``index`` of a batch as a view (same type as the batch, nothing copied)."""
    count = batch_size(images)
    if not 0 <= index < count:
        raise IndexError(f"Image index {index} is outside a batch of {count}.")
    return images if len(images.shape) == 3 else images[index]


def iter_batch(images):
    """Each image of a batch in order, as views of the batch."""
    for index in range(batch_size(images)):
        yield batch_item(images, index)


def decode_base64_image(b64, **kw) -> np.ndarray:
    """Strict base64 (optionally a data URL, with line breaks) to ``[H, W, 3]`` uint8."""
    return decode_image(decode_base64(b64), **kw)


EXTREME_SIZES = [(1, 1), (20000, 10), (10, 20000), (64, 160), (3073, 3073), (4000, 1000)]


def reference_uint8(values: np.ndarray) -> np.ndarray:
    """The conversion spelled out the slow, obvious way, in the same float32 arithmetic."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, as intended
        clean = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(clean, 0, 1) * np.float32(255)).astype(np.uint8)


def smooth_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like picture without fine detail: low-frequency colour waves."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.float32)[None, :, None] / max(width, 2)
    y = np.arange(height, dtype=np.float32)[:, None, None] / max(height, 2)
    phase_x, phase_y = rng.uniform(0, 6.28, (2, 1, 1, 3)).astype(np.float32)
    # Separable (a row wave plus a column wave) so that even 3073 x 3073 is quick to build.
    return reference_uint8(0.5 + 0.2 * np.sin(3 * x + phase_x) + 0.2 * np.cos(2 * y + phase_y))


def noisy_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def meets_limits(size: ImageSize) -> bool:
    return (
        size.width >= MIN_SIDE
        and size.height >= MIN_SIDE
        and MIN_PIXELS <= size.pixels <= MAX_PIXELS
        and max(size.width, size.height) <= MAX_ASPECT * min(size.width, size.height)
    )


# --- to_uint8_rgb --------------------------------------------------------------------------


class TestToUint8Rgb:
    def test_three_channels_round_not_truncate(self):
        values = np.array([[[0.0, 0.999, 0.5 / 255], [1.0, 0.6 / 255, 0.4 / 255]]], dtype=np.float32)
        out = to_uint8_rgb(values)
        assert out.dtype == np.uint8 and out.shape == (1, 2, 3) and out.flags.c_contiguous
        assert out.tolist() == [[[0, 255, 0], [255, 1, 0]]]

    def test_nan_inf_and_out_of_range(self):
        values = np.array([np.nan, np.inf, -np.inf, -0.5, 1.5, 0.2, -0.0, 1e30, -1e30], dtype=np.float64)
        out = to_uint8_rgb(np.repeat(values[None, :, None], 3, axis=2))
        assert out[0, :, 0].tolist() == [0, 255, 0, 0, 255, 51, 0, 255, 0]

    def test_one_channel_is_grey(self):
        grey = np.array([[[0.0], [1.0], [0.2]]], dtype=np.float32)
        assert to_uint8_rgb(grey).tolist() == [[[0, 0, 0], [255, 255, 255], [51, 51, 51]]]

    def test_two_channels_are_grey_plus_alpha(self):
        grey_alpha = np.array([[[0.2, 0.0], [1.0, 0.5]]], dtype=np.float32)
        assert to_uint8_rgb(grey_alpha).tolist() == [[[51, 51, 51], [255, 255, 255]]]

    def test_four_channels_drop_alpha(self):
        rgba = np.array([[[0.2, 0.4, 0.6, 0.0], [1.0, 0.0, 1.0, 1.0]]], dtype=np.float32)
        assert to_uint8_rgb(rgba).tolist() == [[[51, 102, 153], [255, 0, 255]]]

    @pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
    def test_float_dtypes(self, dtype):
        values = np.linspace(-0.1, 1.1, 4 * 5 * 3).reshape(4, 5, 3).astype(dtype)
        assert np.array_equal(to_uint8_rgb(values), reference_uint8(values))

    def test_uint8_is_taken_as_is(self):
        pixels = noisy_image(7, 5)
        assert np.array_equal(to_uint8_rgb(pixels), pixels)
        rgba = np.concatenate([pixels, np.zeros((5, 7, 1), np.uint8)], axis=2)
        assert np.array_equal(to_uint8_rgb(rgba), pixels)

    def test_other_integer_dtypes(self):
        assert to_uint8_rgb(np.array([[[0, 65535, 257]]], dtype=np.uint16)).tolist() == [[[0, 255, 1]]]
        assert to_uint8_rgb(np.array([[[True, False, True]]])).tolist() == [[[255, 0, 255]]]
        assert to_uint8_rgb(np.array([[[-5, 100, 300]]], dtype=np.int32)).tolist() == [[[0, 100, 255]]]

    @pytest.mark.parametrize("shape", [(4, 4), (1, 4, 4, 3), (4,)])
    def test_wrong_ndim(self, shape):
        with pytest.raises(InvalidImageError, match="expected \\[height, width, channels\\]"):
            to_uint8_rgb(np.zeros(shape, np.float32))

    def test_wrong_channel_count_names_the_image(self):
        with pytest.raises(InvalidImageError) as info:
            to_uint8_rgb(np.zeros((4, 4, 5), np.float32), index=2)
        assert str(info.value) == "Image 3 of the batch has 5 channels; expected 1, 3 or 4."

    @pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0, 3)])
    def test_empty_side(self, shape):
        with pytest.raises(InvalidImageError, match="at least one pixel"):
            to_uint8_rgb(np.zeros(shape, np.float32))

    def test_complex_values_refused(self):
        with pytest.raises(InvalidImageError, match="complex"):
            to_uint8_rgb(np.zeros((2, 2, 3), np.complex64))

    @settings(max_examples=60, deadline=None)
    @given(
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64, np.float16]),
            shape=st.tuples(st.integers(1, 300), st.integers(1, 300), st.integers(1, 4)),
            elements={"allow_nan": True, "allow_infinity": True, "min_value": None, "max_value": None},
        )
    )
    def test_property_matches_reference(self, values):
        out = to_uint8_rgb(values)
        height, width, channels = values.shape
        assert out.shape == (height, width, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
        colour = values[:, :, :1] if channels <= 2 else values[:, :, :3]
        assert np.array_equal(out, np.broadcast_to(reference_uint8(colour), out.shape))


def test_module_does_not_import_torch():
    code = "import sys, structure_api.images; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- batches -------------------------------------------------------------------------------


class TestBatch:
    def test_four_dimensional_batch_items_are_views(self):
        batch = np.zeros((3, 4, 5, 3), np.float32)
        assert batch_size(batch) == 3
        item = batch_item(batch, 2)
        assert item.shape == (4, 5, 3) and np.shares_memory(item, batch)
        assert len(list(iter_batch(batch))) == 3

    def test_three_dimensional_is_a_batch_of_one(self):
        image = np.zeros((4, 5, 3), np.float32)
        assert batch_size(image) == 1 and batch_item(image, 0) is image

    def test_empty_batch_refused(self):
        with pytest.raises(InvalidImageError, match="empty"):
            batch_size(np.zeros((0, 4, 4, 3), np.float32))

    def test_wrong_ndim_refused(self):
        with pytest.raises(InvalidImageError, match="batch"):
            batch_size(np.zeros((4, 4), np.float32))

    def test_index_out_of_range(self):
        with pytest.raises(IndexError):
            batch_item(np.zeros((2, 4, 4, 3), np.float32), 2)


# --- fit_to_limits / restore_from_fit ---------------------------------------------------------


class TestFit:
    @pytest.mark.parametrize("width,height", EXTREME_SIZES)
    def test_extreme_sizes_meet_limits_and_restore_to_original_size(self, width, height):
        pixels = noisy_image(width, height)
        fitted, plan = fit_to_limits(pixels)
        sent = ImageSize.of(fitted)
        assert fitted.dtype == np.uint8 and fitted.shape[2] == 3
        assert sent == plan.sent and meets_limits(sent)
        assert plan.original == ImageSize(width=width, height=height)
        restored = restore_from_fit(fitted, plan)
        assert restored.shape == (height, width, 3) and restored.dtype == np.uint8

    @pytest.mark.parametrize("width,height", [(64, 160), (160, 64), (512, 512), (3072, 3072), (64, 64)])
    def test_fitting_image_is_returned_as_the_same_object(self, width, height):
        pixels = noisy_image(width, height)
        fitted, plan = fit_to_limits(pixels)
        assert fitted is pixels and not plan.changed and plan == FitPlan.identity(plan.original)
        assert restore_from_fit(fitted, plan) is fitted

    def test_padding_keeps_content_and_replicates_edges(self):
        pixels = noisy_image(4000, 1000)
        fitted, plan = fit_to_limits(pixels)
        assert plan.padded and not plan.scaled and plan.sent == ImageSize(width=4000, height=1600)
        top = plan.content_top
        assert top == 300
        assert np.array_equal(fitted[top : top + 1000], pixels)
        assert (fitted[:top] == pixels[0]).all() and (fitted[top + 1000 :] == pixels[-1]).all()
        # The service answers at the size sent; padding only is undone exactly.
        assert np.array_equal(restore_from_fit(fitted, plan), pixels)

    def test_tall_padding_is_symmetric(self):
        fitted, plan = fit_to_limits(noisy_image(100, 1000))
        assert plan.sent == ImageSize(width=400, height=1000)
        left = plan.content_left
        right = plan.sent.width - plan.content.width - left
        assert abs(left - right) <= 1

    def test_downscale_round_trip_is_close(self):
        pixels = smooth_image(3073, 3073)
        fitted, plan = fit_to_limits(pixels)
        assert plan.sent == ImageSize(width=3072, height=3072) and not plan.padded
        restored = restore_from_fit(fitted, plan)
        # Down 1 px and back up resamples every pixel twice; on a smooth picture (no detail
        # finer than a few hundred pixels) each pass moves a value by a fraction of a level,
        # so within 2 levels everywhere. Noise would not survive, hence the smooth image.
        difference = np.abs(restored.astype(int) - pixels.astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.5

    def test_upscale_round_trip_is_close(self):
        pixels = smooth_image(40, 30)
        fitted, plan = fit_to_limits(pixels)
        assert ImageSize.of(fitted) == ImageSize(width=85, height=64) and meets_limits(plan.sent)
        restored = restore_from_fit(fitted, plan)
        # Bicubic up then Lanczos down blurs and rings a little at the sharpest slopes of the
        # waves; 3 levels (1.2%) is invisible, and a real bug (offset, flip, wrong scale) is far over.
        difference = np.abs(restored.astype(int) - pixels.astype(int))
        assert difference.max() <= 3 and difference.mean() < 1.0

    def test_result_of_slightly_different_size_is_tolerated(self):
        pixels = smooth_image(600, 150)
        fitted, plan = fit_to_limits(pixels)
        off_by_some = np.array(Image.fromarray(fitted).resize((plan.sent.width + 3, plan.sent.height - 2)))
        restored = restore_from_fit(off_by_some, plan)
        assert restored.shape == pixels.shape
        # The content box is mapped onto the other scale: the picture stays in place.
        assert np.abs(restored.astype(int) - pixels.astype(int)).mean() < 3

    def test_one_pixel_image(self):
        pixels = np.array([[[10, 200, 30]]], np.uint8)
        fitted, plan = fit_to_limits(pixels)
        assert fitted.shape == (64, 64, 3) and (fitted == pixels[0, 0]).all()
        assert np.array_equal(restore_from_fit(fitted, plan), pixels)

    def test_extreme_sliver_keeps_its_colour(self):
        pixels = np.zeros((10, 20000, 3), np.uint8)
        pixels[:] = (200, 100, 50)
        fitted, plan = fit_to_limits(pixels)
        assert (fitted == (200, 100, 50)).all()
        assert (restore_from_fit(fitted, plan) == (200, 100, 50)).all()

    def test_wrong_input_refused(self):
        with pytest.raises(InvalidImageError):
            fit_to_limits(np.zeros((10, 10, 3), np.float32))

    @settings(max_examples=400, deadline=None)
    @given(st.integers(1, 100_000), st.integers(1, 100_000))
    def test_property_plan_meets_every_limit(self, width, height):
        plan = plan_fit(ImageSize(width=width, height=height))
        assert meets_limits(plan.sent)
        assert plan.content.width >= 1 and plan.content.height >= 1
        assert 0 <= plan.content_left and plan.content_left + plan.content.width <= plan.sent.width
        assert 0 <= plan.content_top and plan.content_top + plan.content.height <= plan.sent.height
        # Padding goes on one axis only, split evenly.
        assert plan.content.width == plan.sent.width or plan.content.height == plan.sent.height
        assert abs(2 * plan.content_left + plan.content.width - plan.sent.width) <= 1
        assert abs(2 * plan.content_top + plan.content.height - plan.sent.height) <= 1
        assert plan.changed == (not meets_limits(ImageSize(width=width, height=height)))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**32 - 1))
    def test_property_fit_then_restore(self, width, height, seed):
        pixels = noisy_image(width, height, seed)
        fitted, plan = fit_to_limits(pixels)
        assert ImageSize.of(fitted) == plan.sent and meets_limits(plan.sent)
        restored = restore_from_fit(fitted, plan)
        assert restored.shape == pixels.shape and restored.dtype == np.uint8
        if not plan.scaled:
            assert np.array_equal(restored, pixels)


# --- encoding --------------------------------------------------------------------------------


class TestEncode:
    @pytest.mark.parametrize("width,height", [(1, 1), (1, 300), (300, 1), (257, 131), (1024, 768)])
    def test_png_round_trip_is_lossless(self, width, height):
        for pixels in (noisy_image(width, height), smooth_image(width, height)):
            encoded = encode_upload(pixels)
            assert encoded.format == "png" and encoded.mime_type == "image/png"
            assert encoded.filename == "image.png" and encoded.size == ImageSize(width=width, height=height)
            assert np.array_equal(decode_image(encoded.data), pixels)

    def test_png_is_valid_for_pillow(self):
        pixels = smooth_image(300, 200)
        data = encode_png(pixels)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # checks every chunk CRC
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)

    def test_flat_picture_takes_the_second_pass_and_stays_lossless(self):
        pixels = np.zeros((512, 512, 3), np.uint8)
        pixels[100:300, 50:400] = (255, 10, 10)
        pixels[::7] = 40
        data = encode_png(pixels)
        assert len(data) < 0.02 * pixels.nbytes
        assert np.array_equal(decode_image(data), pixels)

    def test_non_contiguous_input(self):
        pixels = noisy_image(64, 80)[:, ::-1]
        assert np.array_equal(decode_image(encode_png(pixels)), pixels)

    @settings(max_examples=40, deadline=None)
    @given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 64), st.integers(1, 64), st.just(3))))
    def test_property_png_lossless(self, pixels):
        assert np.array_equal(decode_image(encode_png(pixels)), pixels)

    def test_falls_back_to_jpeg_when_png_too_big(self):
        pixels = smooth_image(256, 256)
        png_size = len(encode_png(pixels))
        encoded = encode_upload(pixels, max_bytes=png_size - 1)
        assert (
            encoded.format == "jpeg" and encoded.mime_type == "image/jpeg" and encoded.filename == "image.jpg"
        )
        assert len(encoded.data) <= png_size - 1 and detect_format(encoded.data) == "jpeg"
        decoded = decode_image(encoded.data)
        assert decoded.shape == pixels.shape
        # Quality 95 on a smooth picture: JPEG's error stays around a level.
        assert np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 2

    def test_lower_jpeg_quality_when_needed(self):
        rng = np.random.default_rng(3)
        pixels = np.clip(smooth_image(256, 256) + rng.normal(0, 4, (256, 256, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=95, subsampling=0)
        best_jpeg = len(buffer.getvalue())
        tight = encode_upload(pixels, max_bytes=best_jpeg - 1)
        assert tight.format == "jpeg" and len(tight.data) < best_jpeg
        assert decode_image(tight.data).shape == pixels.shape

    def test_nothing_fits(self):
        with pytest.raises(InvalidImageError, match="does not fit"):
            encode_upload(noisy_image(256, 256), max_bytes=100)

    def test_default_budget_leaves_form_headroom(self):
        import inspect

        default = inspect.signature(encode_upload).parameters["max_bytes"].default
        assert default == MAX_REQUEST_BYTES - 65536

    def test_encoded_image_fields(self):
        image = EncodedImage(
            data=b"x", format="webp", mime_type="image/webp", size=ImageSize(width=1, height=2)
        )
        assert image.filename == "image.webp" and image.size.pixels == 2


# --- decoding --------------------------------------------------------------------------------


def patched_png_size(data: bytes, width: int, height: int) -> bytes:
    """A valid PNG whose IHDR now declares another size, with the IHDR CRC fixed up."""
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return data[:16] + ihdr + crc + data[33:]


class TestDecode:
    def test_refuses_a_decompression_bomb_before_decoding(self):
        bomb = patched_png_size(png_bytes(Image.new("RGB", (8, 8))), 100_000, 100_000)
        started = time.perf_counter()
        with pytest.raises(MalformedResponseError) as info:
            decode_image(bomb)
        # 10^10 pixels would take 30 GB and minutes to decode; refusing takes no time at all.
        assert time.perf_counter() - started < 0.5
        assert str(info.value) == (
            "The service returned an image of 100000 x 100000 pixels, "
            "larger than any it can produce; it was not decoded."
        )

    def test_refuses_an_image_over_its_own_limit(self):
        # 7000 x 7000 is under Pillow's own bomb guard: only our check stands in the way.
        bomb = patched_png_size(png_bytes(Image.new("RGB", (8, 8))), 7000, 7000)
        with pytest.raises(MalformedResponseError, match="7000 x 7000 pixels"):
            decode_image(bomb)
        with pytest.raises(MalformedResponseError, match="64 x 64 pixels"):
            decode_image(png_bytes(Image.new("RGB", (64, 64))), max_pixels=4095)

    @pytest.mark.parametrize(
        "garbage", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"\xff\xd8\xff" * 3]
    )
    def test_refuses_garbage(self, garbage):
        with pytest.raises(MalformedResponseError, match="not an image|cut short"):
            decode_image(garbage)

    def test_refuses_empty(self):
        with pytest.raises(MalformedResponseError, match="empty"):
            decode_image(b"")

    def test_refuses_truncated_png(self, monkeypatch):
        data = encode_png(noisy_image(100, 100))
        with pytest.raises(MalformedResponseError):
            decode_image(data[: len(data) // 2])
        # Still refused when another node has told Pillow to accept truncated files.
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        with pytest.raises(MalformedResponseError):
            decode_image(data[: len(data) // 2])

    def test_refuses_truncated_jpeg(self):
        buffer = io.BytesIO()
        Image.fromarray(noisy_image(100, 100)).save(buffer, "JPEG")
        with pytest.raises(MalformedResponseError):
            decode_image(buffer.getvalue()[:-200])

    def test_refuses_corrupted_png_data(self):
        data = bytearray(encode_png(noisy_image(100, 100)))
        data[200:260] = b"\0" * 60  # inside the IDAT: the chunk CRC no longer matches
        with pytest.raises(MalformedResponseError):
            decode_image(bytes(data))

    def test_rgba_drops_alpha(self):
        rgba = np.zeros((4, 5, 4), np.uint8)
        rgba[..., :3] = noisy_image(5, 4)
        rgba[..., 3] = 0  # fully transparent: colour must survive, not be composited away
        decoded = decode_image(png_bytes(Image.fromarray(rgba, "RGBA")))
        assert np.array_equal(decoded, rgba[..., :3])

    @pytest.mark.parametrize("mode", ["L", "LA", "1"])
    def test_grey_modes(self, mode):
        grey = Image.fromarray(np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6), "L").convert(mode)
        decoded = decode_image(png_bytes(grey))
        expected = np.asarray(grey.convert("L"))
        assert decoded.shape == (4, 6, 3) and all(np.array_equal(decoded[..., c], expected) for c in range(3))

    def test_palette_with_transparency(self):
        image = Image.new("P", (4, 4))
        image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
        image.putpixel((1, 1), 1)
        image.info["transparency"] = 0
        decoded = decode_image(png_bytes(image, transparency=0))
        assert decoded[0, 0].tolist() == [10, 20, 30] and decoded[1, 1].tolist() == [200, 100, 50]

    def test_sixteen_bit_grey_is_scaled_not_clipped(self):
        values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
        image = Image.fromarray(values)
        assert image.mode.startswith("I")
        decoded = decode_image(png_bytes(image))
        assert decoded[0, :, 0].tolist() == [0, 1, 128, 255]

    def test_cmyk_jpeg(self):
        buffer = io.BytesIO()
        Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(buffer, "JPEG", quality=100)
        decoded = decode_image(buffer.getvalue())
        red, green, blue = decoded[8, 8].tolist()
        assert red > 240 and green < 15 and blue < 15

    def test_webp_lossless_round_trip(self):
        pixels = noisy_image(40, 30)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "WEBP", lossless=True)
        assert detect_format(buffer.getvalue()) == "webp"
        assert np.array_equal(decode_image(buffer.getvalue()), pixels)

    def test_result_is_writable(self):
        assert decode_image(encode_png(noisy_image(8, 8))).flags.writeable

    def test_detect_format(self):
        assert detect_format(encode_png(noisy_image(2, 2))) == "png"
        assert detect_format(b"\xff\xd8\xff\xe0rest") == "jpeg"
        assert detect_format(b"RIFF\0\0\0\0WEBPVP8L") == "webp"
        assert (
            detect_format(b"GIF89a") is None and detect_format(b"") is None and detect_format(b"RIFF") is None
        )


class TestDecodeBase64:
    def test_plain_data_url_and_line_breaks(self):
        pixels = noisy_image(9, 7)
        raw = encode_png(pixels)
        text = base64.b64encode(raw).decode()
        assert np.array_equal(decode_base64_image(text), pixels)
        assert np.array_equal(decode_base64_image(text.encode()), pixels)
        wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\r\n"
        assert np.array_equal(decode_base64_image("data:image/png;base64," + wrapped), pixels)

    @pytest.mark.parametrize("bad", ["not base64!!", "QUJD=", "QUJDRA", "data:image/png,QUJD", "ÄÖÜ=", ""])
    def test_refuses_non_base64(self, bad):
        with pytest.raises(MalformedResponseError):
            decode_base64_image(bad)

    def test_message(self):
        with pytest.raises(MalformedResponseError) as info:
            decode_base64_image("@@@@")
        assert str(info.value) == "The service's answer held an image that is not valid base64."

    def test_passes_max_pixels_through(self):
        text = base64.b64encode(png_bytes(Image.new("RGB", (64, 64))))
        with pytest.raises(MalformedResponseError, match="64 x 64"):
            decode_base64_image(text, max_pixels=100)


# --- back to float batches -------------------------------------------------------------------


class TestFloatOutput:
    def test_every_level_round_trips_exactly(self):
        levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
        floats = uint8_to_float(levels)
        assert floats.dtype == np.float32 and floats.min() == 0.0 and floats.max() == 1.0
        assert np.array_equal(to_uint8_rgb(floats), levels)

    def test_writes_into_a_numpy_batch_slice(self):
        batch = new_output_batch(3, ImageSize(width=5, height=4))
        assert isinstance(batch, np.ndarray) and batch.shape == (3, 4, 5, 3) and batch.dtype == np.float32
        pixels = noisy_image(5, 4)
        result = uint8_to_float(pixels, out=as_numpy(batch)[1])
        assert np.shares_memory(result, batch)
        assert (
            np.array_equal(batch[1], pixels / np.float32(255)) and not batch[0].any() and not batch[2].any()
        )

    def test_shape_mismatch_refused(self):
        with pytest.raises(ValueError):
            uint8_to_float(noisy_image(5, 4), out=np.zeros((4, 4, 3), np.float32))
