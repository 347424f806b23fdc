"""ComfyUI node "Structure (AIThriving)": schema, then one call into structure_api."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import comfy.model_management
import comfy.utils
from comfy_api.latest import io
from server import PromptServer

from .structure_api.batch import BatchProgress
from .structure_api.contract import (
    CREDITS_PER_IMAGE, DEFAULT_CONTROL_STRENGTH, DEFAULT_OUTPUT_FORMAT, LIMITS_BROKEN_TEXT, MAX_CONTROL_STRENGTH,
    MAX_SEED, MIN_CONTROL_STRENGTH, OUTPUT_FORMATS, PROMPT_RANGE_TEXT, validate_prompt)
from .structure_api.errors import InputError, MissingAPIKeyError
from .structure_api.files import write_atomically
from .structure_api.offline import LOCAL_LABEL, RunSetup, client_for_run, process_standin
from .structure_api.pipeline import BatchResult, StructureParams, generate_images

CATEGORY = "image/AIThriving"
# The picture the example workflows (the template browser's entries) load with LoadImage.
EXAMPLE_INPUT = Path(__file__).resolve().parent / "example_workflows" / "structure_example.png"
OUTSIDE_LIMITS_OPTIONS = ["fit and restore size", "fail"]
_OUTSIDE_LIMITS_MODES = {"fit and restore size": "fit", "fail": "fail"}
# How often a running node shows its progress and checks for Cancel, in seconds.
_POLL_SECONDS = 0.1


class AIThrivingStructure(io.ComfyNode):
    """Generates a new image that keeps the structure (edges, layout) of each input image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AIThrivingStructure",
            display_name="Structure (AIThriving)",
            category=CATEGORY,
            description=(
                "Sends each image to the AIThriving Structure service, which generates a new image that "
                f"keeps the input's edges and layout, guided by the prompt. Costs {CREDITS_PER_IMAGE} credits "
                "per image. Set the API key in Settings → AIThriving (or the AITHRIVING_API_KEY environment "
                "variable); it never goes into the workflow. The free local stand-in, switched on there too, "
                "needs no key and costs nothing."
            ),
            inputs=[
                io.Image.Input(
                    "image",
                    tooltip="The image (or batch) whose structure to keep. Each image of a batch is one "
                            f"request of {CREDITS_PER_IMAGE} credits.",
                    # The web extension's cost badge reads the price from here (it is in /object_info).
                    extra_dict={"credits_per_image": CREDITS_PER_IMAGE}),
                io.String.Input(
                    "prompt", multiline=True, default="",
                    tooltip=f"What the output should show: subjects, style, colours ({PROMPT_RANGE_TEXT})."),
                io.Float.Input(
                    "control_strength", default=DEFAULT_CONTROL_STRENGTH, min=MIN_CONTROL_STRENGTH,
                    max=MAX_CONTROL_STRENGTH, step=0.01,
                    tooltip="How closely the output follows the input's structure: 0 loosely, 1 strictly."),
                io.Int.Input(
                    "seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                    tooltip="Fixes the randomness. 0 lets the service pick one. In a batch, image i uses "
                            "seed + i, so a fixed seed reproduces the whole batch (and is served from the "
                            "result store instead of being paid again)."),
                io.Combo.Input(
                    "output_format", options=list(OUTPUT_FORMATS), default=DEFAULT_OUTPUT_FORMAT,
                    tooltip="Format the service returns. png is lossless; jpeg and webp download faster."),
                io.Combo.Input(
                    "outside_limits", options=OUTSIDE_LIMITS_OPTIONS, default=OUTSIDE_LIMITS_OPTIONS[0],
                    tooltip=f"For an image the service cannot take as is ({LIMITS_BROKEN_TEXT}): fit it "
                            "(scale, pad) and bring the result back to the input's size, or stop with an error."),
                io.String.Input(
                    "negative_prompt", multiline=True, default="", optional=True,
                    tooltip="What the output should not show. Leave empty to send none."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The generated images, in input order, at the "
                                                              "input's size."),
                io.Int.Output(display_name="seed", tooltip="The seed the service used for the first image."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, seed: int = 0, **kwargs) -> object:
        # Seed 0 asks the service for a fresh random image each run, so never reuse an output.
        return float("nan") if seed == 0 else None

    @classmethod
    def validate_inputs(cls, prompt: object = None) -> bool | str:
        # Checked when the workflow is queued, before any node runs; a prompt fed by a link arrives
        # as None here and is checked when the node runs. Only the prompt is named: ComfyUI then still
        # checks every other input's range and choices itself, and a failure is reported once.
        if prompt is None:
            return True
        try:
            validate_prompt(prompt)
        except InputError as error:
            return str(error)
        return True

    @classmethod
    async def execute(cls, image, prompt: str, control_strength: float, seed: int, output_format: str,
                      outside_limits: str, negative_prompt: str = "") -> io.NodeOutput:
        # Async, so that ComfyUI runs other nodes (other Structure nodes, local work) while this one
        # waits on the service; the blocking work runs on a thread of the event loop's executor.
        # cls is the copy ComfyUI made for this run, so its hidden node id is this node's.
        node_id = cls.hidden.unique_id
        params = StructureParams(
            prompt=prompt, control_strength=control_strength, negative_prompt=negative_prompt or "",
            seed=seed, output_format=output_format,
            outside_limits=_OUTSIDE_LIMITS_MODES.get(outside_limits, outside_limits))
        total = int(image.shape[0]) if len(image.shape) == 4 else 1
        bar = comfy.utils.ProgressBar(total, node_id=node_id)
        with contextlib.ExitStack() as stack:
            run = stack.enter_context(_run_setup())

            def spent(credits: int) -> str:
                return LOCAL_LABEL if run.local else f"{credits} credits spent"

            def show(progress: BatchProgress) -> None:
                bar.update_absolute(progress.done, progress.total)
                _status(node_id, f"{progress.message} · {spent(progress.credits)}")

            def work(should_cancel: Callable[[], bool],
                     on_progress: Callable[[BatchProgress], None]) -> BatchResult:
                return generate_images(image, params, client=run.client, store=run.store,
                                       label=f"ComfyUI node {node_id}", on_progress=on_progress,
                                       should_cancel=should_cancel)

            where = f" to the {LOCAL_LABEL}" if run.local else ""
            _status(node_id, f"sending {total} image{'s' if total != 1 else ''}{where}…")
            result, torn_down = await _off_the_loop(work, show)
            background = result.report.background
            if background is not None:
                # The requests left in flight need the client (and the local stand-in) until they end.
                background.add_done_callback(stack.pop_all().close)
        if result.report.cancelled or torn_down is not None:
            left = ""
            if result.report.cancelled:
                left = result.report.in_flight_sentence(run.store, free=run.local)
            _status(node_id, f"cancelled · {spent(result.credits)}" + (f" · {left}" if left else ""))
            if left:
                logging.warning("[AIThriving] node %s cancelled: %s", node_id, left)
            if torn_down is not None:
                raise torn_down
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException(left or "cancelled")
        cached = f" ({result.from_cache} from the result store)" if result.from_cache else ""
        # Answers of a stand-in (offline mode, or `serve` at AITHRIVING_BASE_URL) carry its free mark and
        # count 0 credits: fresh results that cost nothing came from one.
        free = run.local or (result.credits == 0 and result.from_cache < total)
        done = spent(result.credits) if run.local or not free else f"0 credits ({LOCAL_LABEL})"
        _status(node_id, f"done {total} of {total}{cached} · {done}")
        # Sent to the frontend with the "executed" message (and kept in the history): the cost shown on the node.
        cost = {"credits": result.credits, "images": total, "from_cache": result.from_cache,
                "credits_per_image": 0 if free else CREDITS_PER_IMAGE, "seeds": result.seeds,
                "local": run.local, "free": free}
        return io.NodeOutput(result.images, result.seeds[0], ui={"aithriving_cost": [cost]})


async def _off_the_loop(
    work: Callable[[Callable[[], bool], Callable[[BatchProgress], None]], BatchResult],
    show: Callable[[BatchProgress], None],
) -> tuple[BatchResult, Optional[BaseException]]:
    """Run ``work(should_cancel, on_progress)`` on the loop's executor; show its progress on this thread.

    Cancel reaches the work three ways: ComfyUI's interrupt flag (polled by the work), ComfyUI's progress
    hook raising when shown, and this task being cancelled (ComfyUI tears the prompt down when another
    node fails or is interrupted). The work then returns within about a second, and so does this;
    the second item is the task's cancellation, to raise once the node has said what it left behind.
    """
    stop = threading.Event()
    updates: "queue.SimpleQueue[BatchProgress]" = queue.SimpleQueue()

    def should_cancel() -> bool:
        return stop.is_set() or comfy.model_management.processing_interrupted()

    loop = asyncio.get_running_loop()
    # A plain future, not a task: tearing the prompt down cancels tasks, and the thread must be waited for.
    future = loop.run_in_executor(None, contextvars.copy_context().run, work, should_cancel, updates.put)
    torn_down: Optional[BaseException] = None
    interrupted: Optional[BaseException] = None
    while True:
        try:
            await asyncio.wait({future}, timeout=_POLL_SECONDS)
        except asyncio.CancelledError as error:
            stop.set()
            torn_down = torn_down or error
        while True:
            try:
                progress = updates.get_nowait()
            except queue.Empty:
                break
            try:
                show(progress)
            except Exception as error:  # ComfyUI's hook raises InterruptProcessingException after a Cancel
                stop.set()
                interrupted = interrupted or error
        if future.done():
            break
    result = future.result()
    if interrupted is not None and not isinstance(interrupted,
                                                  comfy.model_management.InterruptProcessingException):
        raise interrupted  # a fault of the display itself must surface
    return result, torn_down


@contextlib.contextmanager
def _run_setup() -> Iterator[RunSetup]:
    """The client for this run (closed afterwards); a missing key names the place in ComfyUI to set one."""
    with contextlib.ExitStack() as stack:
        try:
            run = stack.enter_context(client_for_run(process_standin()))
        except MissingAPIKeyError:
            raise MissingAPIKeyError(
                "No API key found: set it in Settings → AIThriving → API key (or in the AITHRIVING_API_KEY "
                "environment variable), or switch on the free local stand-in there.") from None
        yield run


def _status(node_id: object, text: str) -> None:
    if node_id is not None and PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)


NODES = [AIThrivingStructure]


def provide_example_input(input_dir: str) -> None:
    """Put the templates' picture into ComfyUI's input folder, so a template runs as it opens.

    Never replaces a file of that name (the user's own picture stays); a folder that cannot be
    written only costs a line in the log: the user can still pick an image of their own.
    """
    target = Path(input_dir) / EXAMPLE_INPUT.name
    if target.exists():
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomically(target, EXAMPLE_INPUT.read_bytes(), replace=False)
        except FileExistsError:
            pass  # put there meanwhile (another ComfyUI on the same folder): theirs stays
    except OSError as error:
        logging.warning("[AIThriving] Could not copy %s into ComfyUI's input folder (%s); the example "
                        "workflows need an image picked in their Load Image node.", EXAMPLE_INPUT.name,
                        error.strerror or error)
