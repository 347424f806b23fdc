"""structure_api.images with torch tensors: the same bytes as numpy, half types, views and shared memory.

Moved out of tests/test_images.py, which stays torch-free so it runs on Windows Python
(tests/windows/lane.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_images import batch_item, noisy_image, reference_uint8

from structure_api.images import ImageSize, as_numpy, new_output_batch, to_uint8_rgb, uint8_to_float


class TestToUint8Rgb:
    def test_torch_float32_matches_numpy_bytes(self):
        values = np.random.default_rng(1).uniform(-0.2, 1.2, (6, 9, 4)).astype(np.float32)
        values[0, 0, 0] = np.nan
        from_torch = to_uint8_rgb(torch.from_numpy(values))
        from_numpy = to_uint8_rgb(values)
        assert from_torch.tobytes() == from_numpy.tobytes()

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_torch_half_types(self, dtype):
        tensor = torch.linspace(-0.1, 1.1, 5 * 6 * 3).reshape(5, 6, 3).to(dtype)
        expected = reference_uint8(tensor.float().numpy())
        assert np.array_equal(to_uint8_rgb(tensor), expected)

    def test_torch_does_not_touch_the_input(self):
        tensor = torch.rand(4, 5, 3, requires_grad=True)
        before = tensor.detach().clone()
        to_uint8_rgb(tensor)
        assert torch.equal(tensor.detach(), before)

    def test_half_tensor_converted_in_place_leaves_input_alone(self):
        tensor = torch.rand(4, 5, 3).to(torch.float16)
        before = tensor.clone()
        to_uint8_rgb(tensor)
        assert torch.equal(tensor, before)

    def test_non_contiguous_tensor(self):
        chw = torch.rand(3, 8, 5)
        hwc = chw.permute(1, 2, 0)
        assert np.array_equal(to_uint8_rgb(hwc), to_uint8_rgb(hwc.contiguous().numpy()))

    @settings(max_examples=25, deadline=None)
    @given(
        hnp.arrays(
            np.float32,
            st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4])),
            elements=st.floats(-1, 2, width=32),
        )
    )
    def test_property_torch_equals_numpy(self, values):
        assert to_uint8_rgb(torch.from_numpy(values)).tobytes() == to_uint8_rgb(values).tobytes()


class TestBatch:
    def test_torch_batch_items_share_storage(self):
        batch = torch.zeros(2, 4, 5, 3)
        assert batch_item(batch, 1).data_ptr() == batch[1].data_ptr()


class TestFloatOutput:
    def test_torch_batch_shares_memory_with_its_numpy_view(self):
        batch = new_output_batch(2, ImageSize(width=6, height=3), like=torch.zeros(1))
        assert (
            isinstance(batch, torch.Tensor)
            and batch.dtype == torch.float32
            and tuple(batch.shape) == (2, 3, 6, 3)
        )
        pixels = noisy_image(6, 3)
        uint8_to_float(pixels, out=as_numpy(batch)[0])
        assert torch.equal(batch[0], torch.from_numpy(pixels.astype(np.float32) / 255))
