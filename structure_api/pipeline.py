"""The node's logic, free of ComfyUI: an IMAGE batch in, one request per image, the batch out.

IMAGE batches are ``[B, H, W, C]`` float in 0..1 (torch tensor or numpy array).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ._renamed import warn_renamed
from .batch import BatchProgress, BatchReport, max_concurrency_from_env, run_batch
from .client import StructureClient, StructureResult
from .contract import MAX_ASPECT, MAX_PIXELS, MAX_SEED, MIN_SIDE, FormParams
from .errors import InputError, InvalidImageError
from .images import (
    EncodedImage,
    FitPlan,
    ImageSize,
    as_numpy,
    decode_image,
    decode_image_into,
    encode_upload,
    fit_to_limits,
    image_header_size,
    new_output_batch,
    plan_fit,
    restore_from_fit,
    to_uint8_rgb,
    uint8_to_float,
)
from .request import StructureRequest
from .store import ResultStore

FIT_MODES = ("fit", "fail")
# Encoding an upload and decoding an answer are CPU work, and each holds an image's worth of
# scratch: more of them at once than there are cores is no faster, only bigger. Requests wait for
# the service side by side (max_concurrency of them), but their images are encoded and decoded by
# this many threads of their own. Few threads also means few malloc arenas: glibc keeps the memory
# each thread freed in that thread's arena, so 8 workers decoding 2048x2048 answers held ~180 MB of
# free-but-kept pages on top of what was in use.
CPU_THREADS = max(2, min(4, os.cpu_count() or 2))


def batch_seeds(seed: int, count: int) -> list[int]:
    """Seeds for a batch: 0 stays 0 (the service picks), else seed+i wrapping within 1..MAX_SEED."""
    if seed == 0:
        return [0] * count
    return [(seed - 1 + i) % MAX_SEED + 1 for i in range(count)]


@dataclass(frozen=True, kw_only=True)
class StructureParams(FormParams):
    """The node's parameters, shared by every image of a batch: the form's values and what to do with an
    image outside the service's limits."""

    outside_limits: str = "fit"  # "fit": fit, send, bring back to the input's size; "fail": refuse

    def validate(self) -> None:
        """Check everything but the image before any work starts."""
        if self.outside_limits not in FIT_MODES:
            raise InputError(
                f"outside_limits must be one of {', '.join(FIT_MODES)}; got {self.outside_limits!r}."
            )
        self.validate_form()


@dataclass
class BatchResult:
    """The output batch (same type as the input: torch or numpy) and what it took."""

    images: object
    seeds: list[int]
    credits: int
    from_store: int
    report: BatchReport

    @property
    def from_cache(self) -> int:  # old spelling, for one release
        """Return ``from_store`` (the old spelling of its name)."""
        warn_renamed("BatchResult.from_cache", "BatchResult.from_store")
        return self.from_store


def _batch_dims(images: object) -> tuple[int, ImageSize]:
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise InvalidImageError(
            f"Expected an image batch shaped [batch, height, width, channels]; got shape {list(shape)}."
        )
    count, height, width, channels = shape
    if count == 0:
        raise InvalidImageError("The image batch is empty: connect an image with at least one picture.")
    if height == 0 or width == 0:
        raise InvalidImageError(
            f"The images are {width}x{height} pixels; they need at least one pixel each side."
        )
    if channels not in (1, 2, 3, 4):
        raise InvalidImageError(
            f"The images have {channels} channels; expected 1 to 4 (grey, grey+alpha, RGB, RGBA)."
        )
    return count, ImageSize(width=width, height=height)


def _refuse_outside_limits(params: StructureParams, size: ImageSize) -> None:
    if params.outside_limits == "fail" and plan_fit(size).changed:
        raise InvalidImageError(
            f"The images are {size.width}x{size.height} pixels, outside the service's limits (every side at "
            f"least {MIN_SIDE}, at most {MAX_PIXELS:,} pixels, aspect ratio within {MAX_ASPECT:g}:1); set "
            "outside_limits to 'fit and restore size' to have them fitted automatically."
        )


@dataclass(eq=False)
class _ImageWork:
    """The per-image work of one batch: each upload encoded (fitted if need be), each answer decoded into
    its slice of the output, on a few CPU threads of their own (see CPU_THREADS)."""

    batch: object  # [B, H, W, C]
    params: StructureParams
    seeds: list[int]
    size: ImageSize
    output_pixels: np.ndarray  # [B, H, W, 3] float32, a view of the output batch
    store: ResultStore
    plans: dict[int, FitPlan] = field(default_factory=dict)
    cpu: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.cpu = ThreadPoolExecutor(
            max_workers=min(CPU_THREADS, len(self.seeds)), thread_name_prefix="aithriving-cpu"
        )

    def encode(self, index: int) -> EncodedImage:
        pixels = to_uint8_rgb(self.batch[index])
        if self.params.outside_limits == "fit":
            pixels, plan = fit_to_limits(pixels)
            self.plans[index] = plan
        return encode_upload(pixels)

    def decode_into_output(self, index: int, result: StructureResult) -> None:
        plan = self.plans.get(index) or FitPlan.identity(self.size)
        if not plan.changed and image_header_size(result.data) == self.size:
            # The common case: pixels go from the decoder straight into the output slice.
            decode_image_into(result.data, self.output_pixels[index])
            return
        pixels = restore_from_fit(decode_image(result.data), plan)
        uint8_to_float(pixels, out=self.output_pixels[index])

    def make_request(self, index: int) -> StructureRequest:
        upload = self.cpu.submit(self.encode, index).result()
        return StructureRequest(image=upload, **{**self.params.form_values(), "seed": self.seeds[index]})

    def on_result(self, index: int, result: StructureResult) -> None:
        # A MalformedResponseError (bytes that do not decode) makes run_batch discard the result.
        self.cpu.submit(self.decode_into_output, index, result).result()

    def close(self) -> None:
        self.cpu.shutdown(wait=False, cancel_futures=True)


def _finish(report: BatchReport, store: ResultStore, output: object) -> BatchResult:
    """Release what a failed or cancelled batch got; else raise for failures, or mark all delivered."""
    if report.cancelled or report.failures:
        # Not delivered: a re-run of this batch takes these results instead of paying again.
        report.release(store)
    if report.cancelled:
        return BatchResult(
            images=None, seeds=[], credits=report.credits, from_store=len(report.from_store), report=report
        )
    report.raise_for_failures(store=store)
    report.mark_delivered(store)
    used = [report.seeds[index] for index in range(report.total)]
    return BatchResult(
        images=output, seeds=used, credits=report.credits, from_store=len(report.from_store), report=report
    )


def generate_images(
    images: object,
    params: StructureParams,
    *,
    client: StructureClient | None = None,
    store: ResultStore | None = None,
    label: str = "",
    max_concurrency: int | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    keep_in_flight: bool = True,
) -> BatchResult:
    """One request per image, run concurrently; results land in input order at the input's size.

    Every answer is kept in ``store`` (default: the one AITHRIVING_CACHE_DIR configures) before it
    is decoded; a re-run of the same batch takes the store's undelivered results first, with seed 0
    too. Raises InputError before any request for bad parameters or images, BatchError (or the
    single error, for one image) naming each failed image and what was kept. When ``should_cancel``
    turns True the call returns early with ``report.cancelled`` set and no images; what was paid
    stays in the store for the next run, and so do the answers of the requests left in flight
    (``report.background``, see :func:`run_batch`; ``keep_in_flight=False`` drops them).
    """
    params.validate()
    count, size = _batch_dims(images)
    _refuse_outside_limits(params, size)
    seeds = batch_seeds(params.seed, count)
    if max_concurrency is None:
        max_concurrency = max_concurrency_from_env()
    if store is None:
        store = ResultStore.from_env()
    own_client = client is None
    if client is None:
        client = StructureClient.from_env()
    output = new_output_batch(count, size, like=images)
    batch = images if len(getattr(images, "shape", ())) == 4 else images[None]
    work = _ImageWork(
        batch=batch, params=params, seeds=seeds, size=size, output_pixels=as_numpy(output), store=store
    )
    try:
        report = run_batch(
            client,
            count,
            work.make_request,
            on_result=work.on_result,
            store=store,
            label=lambda index: f"{label or 'batch'}, image {index + 1} of {count}",
            max_concurrency=max_concurrency,
            on_progress=on_progress,
            should_cancel=should_cancel,
            decode=False,
            keep_in_flight=keep_in_flight,
        )
    except BaseException:
        work.close()
        if own_client:
            client.close()
        raise
    work.close()
    if own_client:
        if report.background is not None:
            # Closing now would drop the answers the service is still making.
            report.background.add_done_callback(client.close)
        else:
            client.close()
    return _finish(report, store, output)
