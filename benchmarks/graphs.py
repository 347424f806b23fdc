"""Graphs in a real ComfyUI: four Structure nodes vs one, and a Structure node beside a slow local node.

ComfyUI (the test harness's, ``python -m tests.comfy.harness setup``) runs with the pack and the
test-only sleep node (``tests/comfy/sleep_node``) linked in, against the stand-in in a process of
its own. Each time is ComfyUI's own, from its ``execution_start`` to its ``execution_success``
message; every run has its own seeds, so neither ComfyUI's cache nor the result store serves it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .servers import ROOT, standin

LATENCY = 2.0  # the service's time per image in the measurement
LOCAL_SECONDS = 2.0  # the local node's work
FOUR_NODES_TARGET = 1.3  # four nodes vs one node
HYBRID_TARGET = 1.2  # hybrid vs the longer of the two alone
PROMPTS = (
    "a watercolor cottage",
    "a neon city at night",
    "a pencil sketch of a barn",
    "a mosaic of a harbour",
)


@dataclass
class GraphResult:
    """Median seconds of each graph over ``repeats`` runs, as ComfyUI timed them."""

    comfyui: str
    repeats: int
    latency: float
    local_seconds: float
    one_node: float
    four_nodes: float
    local_alone: float
    hybrid: float
    requests: int  # requests the stand-in received in all (4 per four-node run, 1 per other Structure run)

    @property
    def four_ratio(self) -> float:
        return self.four_nodes / self.one_node

    @property
    def hybrid_ratio(self) -> float:
        return self.hybrid / max(self.one_node, self.local_alone)

    def four_ok(self) -> bool:
        return self.four_ratio <= FOUR_NODES_TARGET

    def hybrid_ok(self) -> bool:
        return self.hybrid_ratio <= HYBRID_TARGET


def _structure(image: list, prompt: str, seed: int) -> dict:
    return {
        "class_type": "AIThrivingStructure",
        "inputs": {
            "image": image,
            "prompt": prompt,
            "control_strength": 0.7,
            "seed": seed,
            "output_format": "png",
            "outside_limits": "fit and restore size",
            "negative_prompt": "",
        },
    }


def _graph(kind: str, seed: int) -> dict:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "structure_example.png"}}}
    structures = {"one": 1, "four": 4, "hybrid": 1, "local": 0}[kind]
    for number in range(structures):
        graph[str(10 + number)] = _structure(["1", 0], PROMPTS[number], seed + 1000 * number)
        graph[str(20 + number)] = {
            "class_type": "SaveImage",
            "inputs": {"images": [str(10 + number), 0], "filename_prefix": f"{kind}{number}"},
        }
    if kind in ("hybrid", "local"):
        graph["30"] = {
            "class_type": "AIThrivingTestSleep",
            "inputs": {"image": ["1", 0], "seconds": LOCAL_SECONDS + seed * 1e-6},
        }  # a new input each run
        graph["31"] = {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": "local"}}
    return graph


def _seconds(entry: dict) -> float:
    times = {name: data["timestamp"] for name, data in entry["status"]["messages"]}
    if entry["status"].get("status_str") != "success":
        raise RuntimeError(f"a benchmark graph failed: {entry['status']}")
    return (times["execution_success"] - times["execution_start"]) / 1000


def measure_graphs(repeats: int = 3, version: str | None = None) -> GraphResult:
    """Each graph ``repeats`` times, interleaved, after one warm-up run of each."""
    sys.path.insert(0, str(ROOT))
    from tests.comfy import matrix
    from tests.comfy.harness import ComfyServer

    install = matrix.install_of(version or matrix.COMFYUI_VERSION)
    times: dict[str, list[float]] = {"one": [], "four": [], "hybrid": [], "local": []}
    with standin(LATENCY) as server, tempfile.TemporaryDirectory() as folder:
        base = Path(folder, "comfy")
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "aithriving_test_sleep").symlink_to(ROOT / "tests" / "comfy" / "sleep_node")
        env = {
            "AITHRIVING_BASE_URL": server.url,
            "AITHRIVING_API_KEY": "benchmark",
            "AITHRIVING_CACHE_DIR": str(Path(folder, "store")),
        }
        requests = 0
        with ComfyServer(install, env=env, base_dir=base) as comfy:
            seed = 1
            for repeat in range(repeats + 1):
                for kind in times:
                    entry = comfy.run(_graph(kind, seed), timeout=120)
                    seed += 1
                    if repeat:  # the first round warms up (imports, connections, ComfyUI's caches)
                        times[kind].append(_seconds(entry))
                        requests += {"one": 1, "four": 4, "hybrid": 1, "local": 0}[kind]
        return GraphResult(
            comfyui=install.version,
            repeats=repeats,
            latency=LATENCY,
            local_seconds=LOCAL_SECONDS,
            one_node=statistics.median(times["one"]),
            four_nodes=statistics.median(times["four"]),
            local_alone=statistics.median(times["local"]),
            hybrid=statistics.median(times["hybrid"]),
            requests=requests,
        )


def target_rows(result: GraphResult) -> list[str]:
    """The two rows of the report's Targets table."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    return [
        f"| four Structure nodes in one graph vs one node (ComfyUI {result.comfyui}, {result.latency:g} s "
        f"latency), ≤ {FOUR_NODES_TARGET}x | {result.four_ratio:.2f}x ({result.four_nodes:.2f} s vs "
        f"{result.one_node:.2f} s) | {verdict(result.four_ok())} |",
        f"| hybrid: a Structure node beside a {result.local_seconds:g} s local node vs the longer of the two "
        f"alone, ≤ {HYBRID_TARGET}x | {result.hybrid_ratio:.2f}x ({result.hybrid:.2f} s vs "
        f"{max(result.one_node, result.local_alone):.2f} s) | {verdict(result.hybrid_ok())} |",
    ]


def section(result: GraphResult) -> list[str]:
    """The report's section on graphs."""
    return [
        "## Graphs in a real ComfyUI",
        "",
        f"ComfyUI {result.comfyui} (the test harness's, CPU only) with the pack and a test-only local "
        f"node (`tests/comfy/sleep_node`: {result.local_seconds:g} s of synchronous work, as a sampler "
        f"holds the executor), against the stand-in in a process of its own at {result.latency:g} s "
        "latency. Each time is ComfyUI's own, from its `execution_start` to its `execution_success` "
        f"message; median of {result.repeats} interleaved runs after a warm-up round, each run with its "
        "own seeds (nothing comes from ComfyUI's cache or the result store).",
        "",
        "| graph | time (s) |",
        "|---|---:|",
        f"| Load Image → one Structure node → Save Image | {result.one_node:.2f} |",
        f"| Load Image → four Structure nodes (four prompts) → four Save Image | {result.four_nodes:.2f} |",
        f"| Load Image → the local node alone → Save Image | {result.local_alone:.2f} |",
        f"| hybrid: Load Image → a Structure node and the local node side by side | {result.hybrid:.2f} |",
        "",
        "The node's `execute` is `async`: ComfyUI starts it as a task and moves on to other ready nodes "
        "(its own scheduler picks async nodes first), while the requests run on a thread. Four nodes send "
        "their requests together, so they take about one node's time, and a local node runs while the "
        "service works. All requests of a process share one in-flight limit "
        "(`AITHRIVING_MAX_CONCURRENCY`, default 8).",
        "",
    ]


def main() -> int:
    """``python -m benchmarks.graphs``: these rows alone, printed (nothing written)."""
    result = measure_graphs(repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    print("\n".join(target_rows(result) + [""] + section(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
