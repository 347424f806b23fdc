"""Peak memory of the node's batch path beyond its input and output tensors, measured in a fresh process.

Method (Linux): the probe process builds the input batch, runs a small warm-up, returns freed
heap to the system (``malloc_trim``) and reads its resident set size (RSS) as the baseline. It
then resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5, so ``VmHWM`` restarts at
the current RSS), runs ``generate_images`` against the photo stand-in in another process, and
reads ``VmHWM``: the exact peak, not a sample. ``torch.zeros`` writes every page of the output
batch as it allocates it, so the output is wholly resident from the start of the call; the
overhead is ``VmHWM - baseline - output bytes``. A thread sampling RSS every 2 ms runs as well,
as a cross-check and as the fallback where the peak mark cannot be reset.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .servers import ROOT, photo_standin

MIB = 1024 * 1024


@dataclass
class MemoryResult:
    """Bytes measured by the probe for one run of the batch path."""

    count: int
    side: int
    concurrency: int
    input_bytes: int
    output_bytes: int
    baseline_rss: int
    peak_rss: int
    sampled_peak_rss: int
    peak_method: str
    seconds: float

    @property
    def overhead(self) -> int:
        return self.peak_rss - self.baseline_rss - self.output_bytes

    @property
    def sampled_overhead(self) -> int:
        return self.sampled_peak_rss - self.baseline_rss - self.output_bytes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 4 * MIB


class _Sampler(threading.Thread):
    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()
        self._statm = open("/proc/self/statm", "rb", buffering=0)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        self._statm.seek(0)
        return int(self._statm.read().split()[1]) * self._page

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.rss())
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, self.rss())
        self._statm.close()
        return self.peak


def _probe(url: str, count: int, side: int, concurrency: int) -> MemoryResult:
    import torch

    from structure_api.client import StructureClient
    from structure_api.images import decode_image, encode_upload, to_uint8_rgb
    from structure_api.pipeline import StructureParams, generate_images
    from structure_api.store import ResultStore

    from .content import photo_like

    images = torch.empty((count, side, side, 3), dtype=torch.float32)
    for index in range(count):
        images[index] = torch.from_numpy(photo_like(side, side, seed=index))
    # Warm-up without the server: loads Pillow's plugins and the code paths' modules.
    decode_image(encode_upload(to_uint8_rgb(images[0, :64, :64])).data)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    params = StructureParams(prompt="a benchmark picture", seed=1)
    with (
        tempfile.TemporaryDirectory() as store_dir,
        StructureClient(api_key="benchmark", base_url=url) as client,
    ):
        store = ResultStore(Path(store_dir))
        sampler = _Sampler()
        baseline = _status_kib("VmRSS")
        exact = _reset_peak()
        sampler.start()
        started = time.perf_counter()
        result = generate_images(images, params, client=client, store=store, max_concurrency=concurrency)
        seconds = time.perf_counter() - started
        sampled = sampler.stop()
        peak = _status_kib("VmHWM") if exact else sampled
        output = result.images
        if tuple(output.shape) != (count, side, side, 3) or not bool(output[-1].any()):
            raise AssertionError("the batch path did not fill the output")
        return MemoryResult(
            count=count,
            side=side,
            concurrency=concurrency,
            input_bytes=images.numel() * images.element_size(),
            output_bytes=output.numel() * output.element_size(),
            baseline_rss=baseline,
            peak_rss=peak,
            sampled_peak_rss=sampled,
            peak_method="VmHWM after clear_refs" if exact else "RSS sampled every 2 ms",
            seconds=seconds,
        )


def measure_memory(
    count: int = 16, side: int = 2048, concurrency: int = 4, delay: float = 0.5
) -> MemoryResult:
    """Run the probe in a fresh process against the photo stand-in in another; return what it measured."""
    with photo_standin(side, count, delay) as server:
        env = {name: value for name, value in os.environ.items() if not name.startswith("AITHRIVING_")}
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.memory",
                "--url",
                server.url,
                "--count",
                str(count),
                "--side",
                str(side),
                "--concurrency",
                str(concurrency),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if completed.returncode != 0:
        raise RuntimeError(f"the memory probe failed:\n{completed.stderr}")
    return MemoryResult(**json.loads(completed.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="memory probe (run by measure_memory in a fresh process)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--side", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args(argv)
    result = _probe(args.url, args.count, args.side, args.concurrency)
    print(json.dumps(result.__dict__))


if __name__ == "__main__":
    main()
