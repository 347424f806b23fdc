"""The report: machine, tables, the four targets with their verdicts, and how each figure was measured."""

from __future__ import annotations

import datetime
import math
import os
import platform
import zlib
from collections.abc import Sequence

import numpy as np
import PIL
import requests
import torch

from structure_api.batch import DEFAULT_MAX_CONCURRENCY

from .batch_time import BatchResult
from .graphs import GraphResult
from .graphs import section as graphs_section
from .graphs import target_rows as graph_target_rows
from .memory import MemoryResult
from .overhead import PATHS, SizeResult
from .processes import ProcessesRun
from .processes import section as processes_section
from .processes import target_rows as processes_target_rows
from .throughput import CONCURRENCY, LATENCY, LIMIT_REQUESTS, LIMIT_SECONDS, LOCKOUT_SECONDS, ThroughputRun

COMMAND = "python -m benchmarks"
OVERHEAD_RATIO_TARGET = 0.5
UPLOAD_SIZE_RATIO_TARGET = 1.15
BATCH_SECONDS_TARGET = 1.3
BATCH_TARGET_CONCURRENCY = DEFAULT_MAX_CONCURRENCY  # the default settings (AITHRIVING_MAX_CONCURRENCY unset)
MEMORY_TARGET_BYTES = 256 * 10**6
MEMORY_TARGET_CONCURRENCY = DEFAULT_MAX_CONCURRENCY
THROUGHPUT_RATIO_TARGET = 0.9  # of the limit's sustained rate, 150 / 10 s


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _mb(count: int) -> str:
    return f"{count / 10**6:.2f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> list[str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- CPU: {os.cpu_count()} logical cores ({usable} usable by this process), {_cpu_model()}",
        f"- {platform.system()} {platform.release()}, {platform.machine()}",
        f"- Python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), requests {requests.__version__}, "
        f"zlib {zlib.ZLIB_RUNTIME_VERSION}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        # The machine is shared: what else ran weighs on every figure, the CPU-bound ones most.
        "- Load average at the end of the run (1, 5, 15 min): "
        + ", ".join(f"{v:.2f}" for v in os.getloadavg()),
    ]


def overhead_ok(size: SizeResult) -> bool:
    return size.total("pack") <= OVERHEAD_RATIO_TARGET * size.total("naive")


def upload_ok(size: SizeResult) -> bool:
    return size.upload_bytes["pack"] <= UPLOAD_SIZE_RATIO_TARGET * size.upload_bytes["naive"]


def batch_ok(batch: BatchResult) -> bool:
    return batch.concurrent[BATCH_TARGET_CONCURRENCY] <= BATCH_SECONDS_TARGET


def _memory_at(memory: Sequence[MemoryResult], concurrency: int) -> MemoryResult:
    return next(result for result in memory if result.concurrency == concurrency)


def memory_ok(memory: Sequence[MemoryResult]) -> bool:
    return _memory_at(memory, MEMORY_TARGET_CONCURRENCY).overhead < MEMORY_TARGET_BYTES


def _paced(throughput: Sequence[ThroughputRun]) -> ThroughputRun:
    return next(run for run in throughput if run.paced)


def throughput_ok(throughput: Sequence[ThroughputRun]) -> bool:
    run = _paced(throughput)
    return (
        run.delivered == run.images
        and run.failed == 0
        and run.refused_429 == 0
        and not run.timed_out
        and run.ratio_to_limit >= THROUGHPUT_RATIO_TARGET
    )


def all_targets_met(
    sizes: Sequence[SizeResult],
    batch: BatchResult,
    memory: Sequence[MemoryResult],
    throughput: Sequence[ThroughputRun],
    processes: Sequence[ProcessesRun] = (),
    graphs: GraphResult | None = None,
) -> bool:
    return (
        all(overhead_ok(s) and upload_ok(s) for s in sizes)
        and batch_ok(batch)
        and memory_ok(memory)
        and throughput_ok(throughput)
        and all(run.ok for run in processes if run.label != "unshared")
        and (graphs is None or (graphs.four_ok() and graphs.hybrid_ok()))
    )


def _throughput_table(throughput: Sequence[ThroughputRun]) -> list[str]:
    lines = [
        "| run | delivered | failed | 429s answered | lock-outs | images generated | wall time (s) | "
        "images/s | vs the limit's 15/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in throughput:
        if not run.limited:
            name = "no limit (stand-in without `--rate-limit`, pacer off): the ceiling, for comparison"
        elif run.paced:
            name = "pacer on (default, `AITHRIVING_RATE_LIMIT` unset = 150/10)"
        else:
            name = "pacer off (`AITHRIVING_RATE_LIMIT=off`), for comparison"
        stopped = " (stopped: took too long)" if run.timed_out else ""
        lines.append(
            f"| {name}{stopped} | {run.delivered}/{run.images} | {run.failed} | {run.refused_429} "
            f"| {run.lockouts} | {run.generated} | {run.seconds:.1f} | {run.per_second:.2f} "
            f"| {run.ratio_to_limit:.2f}x |"
        )
    return lines


def _span(sizes: Sequence[SizeResult], path: str) -> str:
    ratios = [size.download[path] / size.download["naive"] for size in sizes]
    return f"{min(ratios):.2f}x to {max(ratios):.2f}x"


def _overhead_table(sizes: Sequence[SizeResult]) -> list[str]:
    lines = [
        "| image | path | tensor → request (ms) | answer → tensor (ms) | total (ms) | total vs naive "
        "| answer vs naive | upload (MB) | upload vs naive |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        naive_total = size.total("naive")
        for path in PATHS:
            lines.append(
                f"| {size.side}² | {path} | {_ms(size.upload[path])} | {_ms(size.download[path])} "
                f"| {_ms(size.total(path))} | {size.total(path) / naive_total:.2f}x "
                f"| {size.download[path] / size.download['naive']:.2f}x | {_mb(size.upload_bytes[path])} "
                f"| {size.upload_bytes[path] / size.upload_bytes['naive']:.3f}x |"
            )
    return lines


def render(
    sizes: Sequence[SizeResult],
    batch: BatchResult,
    memory: Sequence[MemoryResult],
    throughput: Sequence[ThroughputRun],
    *,
    seconds: float,
    quick: bool = False,
    processes: Sequence[ProcessesRun] = (),
    graphs: GraphResult | None = None,
) -> str:
    """The whole report as Markdown."""
    at_target = _memory_at(memory, MEMORY_TARGET_CONCURRENCY)
    concurrent = batch.concurrent[BATCH_TARGET_CONCURRENCY]
    repeats = ", ".join(f"{s.side}²: {s.repeats}" for s in sizes)
    out = [
        "# Benchmarks",
        "",
        f"Generated by `{COMMAND}` (from the repository root, in the project's venv) in {seconds:.0f} s; "
        "every figure and ratio below comes from that one run."
        + (" **Quick smoke run: too few repeats to quote.**" if quick else ""),
        "",
        "## Machine",
        "",
        *machine(),
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    for size in sizes:
        ratio = size.total("pack") / size.total("naive")
        out.append(
            f"| per-image overhead at {size.side}² ≤ {OVERHEAD_RATIO_TARGET}x naive "
            f"| {ratio:.2f}x ({_ms(size.total('pack'))} vs {_ms(size.total('naive'))} ms; "
            f"floor {_ms(size.total('floor'))} ms) | {_verdict(overhead_ok(size))} |"
        )
    for size in sizes:
        ratio = size.upload_bytes["pack"] / size.upload_bytes["naive"]
        out.append(
            f"| upload size at {size.side}² ≤ {UPLOAD_SIZE_RATIO_TARGET}x naive PNG | {ratio:.3f}x "
            f"({_mb(size.upload_bytes['pack'])} vs {_mb(size.upload_bytes['naive'])} MB) "
            f"| {_verdict(upload_ok(size))} |"
        )
    paced = _paced(throughput)
    out += [
        f"| batch of {batch.count} at {batch.latency:g} s latency, default settings (concurrency "
        f"{BATCH_TARGET_CONCURRENCY}), ≤ {BATCH_SECONDS_TARGET} s | {concurrent:.2f} s (one image alone "
        f"{batch.single:.2f} s; sequential {batch.sequential:.2f} s) | {_verdict(batch_ok(batch))} |",
        *(graph_target_rows(graphs) if graphs is not None else []),
        f"| {paced.images} images, `structure-api batch --concurrency {CONCURRENCY}`, stand-in at "
        f"{LATENCY:g} s latency limited to {LIMIT_REQUESTS}/{LIMIT_SECONDS:g} with a {LOCKOUT_SECONDS:g} s "
        f"lock-out: all delivered, no 429, ≥ {THROUGHPUT_RATIO_TARGET}x the limit's "
        f"{LIMIT_REQUESTS / LIMIT_SECONDS:g}/s | {paced.delivered}/{paced.images} delivered, "
        f"{paced.refused_429} 429s, {paced.per_second:.2f}/s = {paced.ratio_to_limit:.2f}x | "
        f"{_verdict(throughput_ok(throughput))} |",
        *processes_target_rows(list(processes)),
        f"| memory beyond input and output, {at_target.count} x {at_target.side}², < "
        f"{MEMORY_TARGET_BYTES // 10**6} MB | {_mb(at_target.overhead)} MB "
        f"({at_target.overhead / MEMORY_TARGET_BYTES:.2f}x the cap) | {_verdict(memory_ok(memory))} |",
        "",
        "## Per-image client overhead",
        "",
        f"Photo-like synthetic images (smooth gradients, soft and hard-edged shapes, vignette, Gaussian "
        f"noise of σ≈3/255; `benchmarks/content.py`). Median of N interleaved runs (N per size: {repeats}); "
        "ratios are to the naive path of the same run.",
        "",
        *_overhead_table(sizes),
        "",
        "- **tensor → request**: one `[H, W, 3]` float32 image of the IMAGE batch to the bytes of the image "
        "part of the request. The multipart framing is left out of every path (the pack's costs no copy: it "
        "sends the encoded bytes as they are).",
        "  - *pack*: `to_uint8_rgb` → `fit_to_limits` → `encode_upload` (its own PNG writer: Average filter, "
        "zlib level 1, RLE strategy; lossless).",
        "  - *naive*: `Image.fromarray(np.clip(255. * t.cpu().numpy(), 0, 255).astype(np.uint8))` → "
        '`save(format="PNG")` at Pillow\'s default compression.',
        "  - *floor*: `to_uint8_rgb` plus the cheapest lossless encoding: a PNG of stored (uncompressed) "
        "zlib blocks. Its upload is ~2x the others' and for large images over the service's 10 MiB limit.",
        "- **answer → tensor**: an HTTP body (the service's JSON, `data.image` = base64 of a PNG saved by "
        "Pillow at default settings from a different photo-like image of the same size) to the image in "
        "an IMAGE tensor. Pack and naive read it from a `requests.Response` whose body is in memory.",
        "  - *pack*: `StructureClient`'s own answer handling (read, JSON parse, base64, `decode_image`), "
        "then `restore_from_fit` and `uint8_to_float` into the preallocated output batch, as the node does.",
        '  - *naive*: `response.json()` → `base64.b64decode` → `Image.open(...).convert("RGBA")` → '
        "`np.array(...).astype(np.float32) / 255.0` → `torch.from_numpy(...)[None, :, :, :3]`.",
        "  - *floor*: `binascii.a2b_base64` plus Pillow's PNG decode (`Image.open(...).load()`); nothing "
        "else, not even the conversion to float.",
        "- Every path's output is checked: the uploads decode to the input's pixels (the naive one truncates "
        "instead of rounding), and pack and naive give the answer's exact pixels.",
        f"- The answer direction on its own takes {_span(sizes, 'pack')} the naive path's time. It cannot be "
        f"half at every size: its floor alone (base64 plus Pillow's PNG decode, mostly zlib's inflate) is "
        f"already {_span(sizes, 'floor')}, and the naive path's cost beyond that floor (the RGBA "
        "conversion, then two fresh 4-channel float32 arrays) weighs less the smaller the image. What the "
        "pack adds to that floor is the float conversion written into the output batch, the JSON parse, "
        "the copy of the pixels out of Pillow and the separator count that guards the parse against "
        "hostile answers. The target is on the per-image overhead, both "
        "directions together, which the encoder brings far below half.",
        "",
        "## Batch wall time",
        "",
        f"{batch.count} photo-like images of {batch.side}² against the pack's stand-in (`python -m "
        f"structure_api serve --latency {batch.latency:g}`, in a separate process), which answers each "
        f"request {batch.latency:g} s after it has read it, like a remote service: its own decoding and "
        "rendering are inside that time, not added to it, so what the batch adds to one image's time is "
        f"the pack's work (and the machine's load). Median of {batch.repeats} runs (sequential: 1 run). The "
        "node's path (`generate_images`) runs with a fresh result store, as the node does.",
        "",
        "| run | wall time (s) |",
        "|---|---:|",
        f"| one image alone (`generate_images`, the floor for any batch) | {batch.single:.2f} |",
    ]
    for level, wall in sorted(batch.concurrent.items(), reverse=True):
        name = (
            f"default settings (max_concurrency not given: {level})"
            if level == BATCH_TARGET_CONCURRENCY
            else f"max_concurrency={level}"
        )
        out.append(f"| pack: `generate_images`, {name} | {wall:.2f} |")
    out += [
        f"| one after another (a plain loop over `StructureClient.generate`) | {batch.sequential:.2f} |",
        "",
        f"In the median run at the default settings this process (the pack, "
        f"all threads) used {batch.client_cpu:.2f} s of CPU and the stand-in {batch.standin_cpu:.2f} s. "
        "The stand-in still shares the machine's cores, but its work falls inside the latency, while the "
        "pack waits, as a remote service's does; the pack's encoding before the upload and decoding after "
        "the answer are what the batch adds to the latency.",
        "",
        *(graphs_section(graphs) if graphs is not None else []),
        "## Throughput at the service's rate limit",
        "",
        f"{paced.images} photo-like PNGs of 96² in a folder, sent by `structure-api batch --concurrency "
        f"{CONCURRENCY}` (its own process, so Python's start-up is in the wall time) to the stand-in "
        f"(`structure-api serve --latency {LATENCY:g} --rate-limit {LIMIT_REQUESTS}/{LIMIT_SECONDS:g} "
        f"--lockout {LOCKOUT_SECONDS:g}`, another process), which admits at most {LIMIT_REQUESTS} requests "
        f"in any {LIMIT_SECONDS:g} s and answers every request past that, and every one during the "
        f"following {LOCKOUT_SECONDS:g} s, with a 429 without Retry-After, as the service does (except in "
        'the "no limit" row). Each run starts with a fresh stand-in and an empty result store. The 429 '
        "and lock-out counts are the stand-in's own.",
        "",
        *_throughput_table(throughput),
        "",
        f"At {CONCURRENCY} in flight and {LATENCY:g} s per answer the batch can start at most "
        f"{CONCURRENCY / LATENCY:g} requests a second, barely more than the limit's "
        f"{LIMIT_REQUESTS / LIMIT_SECONDS:g}: even with no limit at all, {paced.images} images take "
        f"{math.ceil(paced.images / CONCURRENCY)} rounds of {LATENCY:g} s, so {paced.images} / "
        f"{math.ceil(paced.images / CONCURRENCY) * LATENCY:g} s = "
        f"{paced.images / (math.ceil(paced.images / CONCURRENCY) * LATENCY):.1f}/s is the ceiling before any "
        'start-up or processing time (the "no limit" row measures it). The pacer lets at most '
        f"{LIMIT_REQUESTS} start in any {LIMIT_SECONDS * 1.02:g} s (the limit's window plus a 2% margin, "
        "counted from when each upload went out): here the second 150 start as the first 150's slots leave "
        "the window, at about the time workers come free anyway, and the waits show in the progress line as "
        '"waiting for a free slot under the service\'s rate limit". Without it the 151st request within '
        "10 s trips the lock-out: the 429s cost nothing, every request of the process pauses and one probes "
        "at growing intervals (429s are waited out for up to 150 s), and the batch resumes when the lock-out "
        "is over, about a minute later.",
        "",
        *(processes_section(list(processes)) if processes else []),
        "## Peak memory of the node's batch path",
        "",
        f"`generate_images` on {at_target.count} photo-like images of {at_target.side}² "
        f"(input {_mb(at_target.input_bytes)} MB of float32, output {_mb(at_target.output_bytes)} MB), in a "
        "fresh process, against the stand-in in another process scripted to answer every request with a "
        f"photo-like {at_target.side}² PNG (as large as a real result; the stand-in's own edge maps compress "
        "to a fraction of that) after 0.5 s, with a fresh result store as the node uses.",
        "",
        "| max_concurrency | beyond input + output (MB) | per image in flight (MB) | peak RSS (MB) | "
        "baseline RSS (MB) | RSS sampled every 2 ms: beyond (MB) | run (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in memory:
        note = " (default)" if result.concurrency == MEMORY_TARGET_CONCURRENCY else ""
        out.append(
            f"| {result.concurrency}{note} | **{_mb(result.overhead)}** | "
            f"{_mb(result.overhead // result.concurrency)} | {_mb(result.peak_rss)} | "
            f"{_mb(result.baseline_rss)} | {_mb(result.sampled_overhead)} | {result.seconds:.1f} |"
        )
    out += [
        "",
        f"Method: peak = {at_target.peak_method}. The baseline is the resident set size (RSS) after the "
        "input batch is built, a warm-up has run and freed heap was returned to the system "
        "(`malloc_trim`); the kernel's peak-RSS mark (`VmHWM`) is then reset (`/proc/self/clear_refs` = 5) "
        "and read after `generate_images` returns. `torch.zeros` writes every page of the output batch "
        "when it allocates it, so the output is wholly resident from the start of the call: overhead = "
        "peak − baseline − output bytes. RSS counts everything (Pillow's and zlib's C buffers, freed "
        "memory glibc keeps, thread stacks), which tracemalloc would not see.",
        "",
        "What one image in flight holds (2048²): while it waits, its upload PNG (~6 MB, kept for a possible "
        "retry); when its answer comes, the body (~9 MB, one buffer sized from Content-Length) and the "
        "decoded PNG bytes (~7 MB, decoded straight from the body: no text copy of the base64), after which "
        "the body and the upload are dropped; the PNG is kept in the result store before anything else. "
        "Decoding then holds Pillow's image (~17 MB, 4 bytes a pixel) and writes the pixels straight into "
        "the image's slice of the output tensor (no uint8 copy). Uploads are encoded and answers decoded by "
        "a few threads of their own (one per core, 2 to 4), so only that many images are ever being "
        "decoded at once, and glibc keeps freed memory in few arenas (8 decoding workers held ~180 MB of "
        "free-but-kept pages). Nothing is held for the whole batch: requests are built as workers need "
        "them, and the batch report keeps no bytes of results that are on disk. Memory grows with "
        "max_concurrency "
        "(`AITHRIVING_MAX_CONCURRENCY`, default "
        + str(MEMORY_TARGET_CONCURRENCY)
        + "), not with the batch: "
        + "; ".join(f"{r.concurrency} in flight need {_mb(r.overhead)} MB" for r in memory)
        + ".",
        "",
    ]
    return "\n".join(out)
