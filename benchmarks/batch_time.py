"""Wall time of a batch against the stand-in answering after a fixed delay: the node's path vs one after
another."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from structure_api.batch import DEFAULT_MAX_CONCURRENCY
from structure_api.client import StructureClient, StructureRequest
from structure_api.images import (
    ImageSize,
    as_numpy,
    encode_upload,
    fit_to_limits,
    new_output_batch,
    restore_from_fit,
    to_uint8_rgb,
    uint8_to_float,
)
from structure_api.pipeline import StructureParams, generate_images
from structure_api.store import ResultStore

from .content import photo_like
from .servers import standin

PROMPT = "a benchmark picture"


@dataclass
class BatchResult:
    """Wall times in seconds; ``concurrent`` maps max_concurrency to the median of ``repeats`` runs."""

    count: int
    side: int
    latency: float
    repeats: int
    single: float  # one image alone through the node's path: what "as long as its slowest image" means here
    concurrent: dict[int, float]
    sequential: float
    # CPU seconds used during the median concurrent run at the default settings, by each side.
    client_cpu: float
    standin_cpu: float


def _sequential(client: StructureClient, images: torch.Tensor) -> torch.Tensor:
    """One request after another, each waiting for the previous answer (what a plain loop does)."""
    count, height, width, _ = images.shape
    output = new_output_batch(count, ImageSize(width=width, height=height), like=images)
    pixels_out = as_numpy(output)
    for index in range(count):
        pixels, plan = fit_to_limits(to_uint8_rgb(images[index]))
        request = StructureRequest(image=encode_upload(pixels), prompt=PROMPT, seed=index + 1)
        result = client.generate(request)
        uint8_to_float(restore_from_fit(result.pixels, plan), out=pixels_out[index])
    return output


def measure_batch(
    count: int = 8,
    side: int = 512,
    latency: float = 1.0,
    concurrency: tuple[int | None, ...] = (None, 4),
    repeats: int = 3,
) -> BatchResult:
    """Time ``count`` images of ``side`` px through ``generate_images`` at each concurrency, and sequentially.

    None in ``concurrency`` is the default settings: ``max_concurrency`` not passed, so the node's
    default (AITHRIVING_MAX_CONCURRENCY unset) applies; it is reported under its value.
    """
    images = torch.from_numpy(np.stack([photo_like(side, side, seed) for seed in range(count)]))
    concurrent: dict[int, list[float]] = {level or DEFAULT_MAX_CONCURRENCY: [] for level in concurrency}
    cpu: list[tuple[float, float, float]] = []  # (wall, client CPU, stand-in CPU) at the default settings
    single: list[float] = []
    with (
        standin(latency) as server,
        tempfile.TemporaryDirectory() as store_dir,
        StructureClient(api_key="benchmark", base_url=server.url) as client,
    ):
        # As the node runs it: with a result store (a fresh, empty one, so nothing is a hit).
        params = StructureParams(prompt=PROMPT, seed=1)
        # Warm-up (imports, connection), into a store of its own so nothing lands in the user's real one.
        generate_images(
            images[:1],
            params,
            client=client,
            store=ResultStore(Path(store_dir, "warm-up")),
            max_concurrency=1,
        )
        for repeat in range(repeats):
            store = ResultStore(Path(store_dir, f"single-{repeat}"))
            started = time.perf_counter()
            generate_images(images[:1], params, client=client, store=store, max_concurrency=1)
            single.append(time.perf_counter() - started)
            for level in concurrency:
                store = ResultStore(Path(store_dir, f"{level}-{repeat}"))
                client_cpu, standin_cpu = time.process_time(), server.cpu_seconds()
                started = time.perf_counter()
                options = {} if level is None else {"max_concurrency": level}
                result = generate_images(images, params, client=client, store=store, **options)
                wall = time.perf_counter() - started
                concurrent[level or DEFAULT_MAX_CONCURRENCY].append(wall)
                if level is None:
                    cpu.append((wall, time.process_time() - client_cpu, server.cpu_seconds() - standin_cpu))
                if tuple(result.images.shape) != tuple(images.shape):
                    raise AssertionError("the batch came back with the wrong shape")
        started = time.perf_counter()
        _sequential(client, images)
        sequential = time.perf_counter() - started
    median_run = sorted(cpu)[len(cpu) // 2]
    return BatchResult(
        count=count,
        side=side,
        latency=latency,
        repeats=repeats,
        single=statistics.median(single),
        concurrent={level: statistics.median(times) for level, times in concurrent.items()},
        sequential=sequential,
        client_cpu=median_run[1],
        standin_cpu=median_run[2],
    )
