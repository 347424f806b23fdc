"""ComfyUI node "Structure (AIThriving)": schema, then one call into structure_api."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import queue
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import comfy.model_management
import comfy.utils
from comfy_api.latest import io
from server import PromptServer

from .structure_api.batch import BatchProgress, BatchReport
from .structure_api.contract import (
    CREDITS_PER_IMAGE,
    DEFAULT_CONTROL_STRENGTH,
    DEFAULT_OUTPUT_FORMAT,
    LIMITS_BROKEN_TEXT,
    MAX_CONTROL_STRENGTH,
    MAX_SEED,
    MIN_CONTROL_STRENGTH,
    OUTPUT_FORMATS,
    PROMPT_RANGE_TEXT,
    validate_prompt,
)
from .structure_api.errors import InputError, MissingAPIKeyError
from .structure_api.files import write_atomically
from .structure_api.offline import RunSetup, client_for_run, destination_fingerprint, process_standin
from .structure_api.pipeline import BatchResult, StructureParams, generate_images

CATEGORY = "image/AIThriving"
# The picture the example workflows (the template browser's entries) load with LoadImage.
EXAMPLE_INPUT = Path(__file__).resolve().parent / "example_workflows" / "structure_example.png"
OUTSIDE_LIMITS_OPTIONS = ["fit and restore size", "fail"]
_OUTSIDE_LIMITS_MODES = {"fit and restore size": "fit", "fail": "fail"}
# How often a running node shows its progress and checks for Cancel, in seconds.
_POLL_SECONDS = 0.1
# What a user may type into the node search to find this node (besides its name). ComfyUI 0.11 and
# later read them from the schema; older servers' io.Schema has no such field (see _search_aliases).
SEARCH_ALIASES = ["controlnet", "structure", "sketch to image", "depth", "edges", "img2img", "aithriving"]
# The node's own texts on the canvas (progress, errors) in each language: locales/<lang>/main.json.
LOCALES = Path(__file__).resolve().parent / "locales"
NODE_TEXTS_KEY = "aithrivingStructureNode"
# ComfyUI's progress hook raises this after a Cancel: an Exception up to 0.3.x, a BaseException
# from 0.33 on (so that a node's `except Exception` cannot swallow a Cancel).
_INTERRUPTED = comfy.model_management.InterruptProcessingException
# The prompts a Cancel reached: their ids, under the event loop ComfyUI runs each prompt in (a prompt id
# a client sends again names a new run). ComfyUI's interrupt flag is one global that the first reader
# to raise on it resets (its progress hook, a node's check), so the other Structure nodes of the prompt,
# running at the same time, may never see it: they look here too.
_CANCELLED_PROMPTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[str | None]] = (
    weakref.WeakKeyDictionary()
)
_CANCELLED_LOCK = threading.Lock()


class AIThrivingStructure(io.ComfyNode):
    """Generates a new image that keeps the structure (edges, layout) of each input image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            **_search_aliases(io.Schema),
            node_id="AIThrivingStructure",
            display_name="Structure (AIThriving)",
            category=CATEGORY,
            description=(
                "Sends each image to the AIThriving Structure service, which generates a new image that "
                f"keeps the input's edges and layout, guided by the prompt. Costs {CREDITS_PER_IMAGE} "
                "credits per image. Set the API key in Settings > AIThriving (or the AITHRIVING_API_KEY "
                "environment variable); it never goes into the workflow. The free stand-in, switched on "
                "there too, needs no key and costs nothing."
            ),
            inputs=[
                io.Image.Input(
                    "image",
                    tooltip="The image (or batch) whose structure to keep. Each image of a batch is one "
                    f"request of {CREDITS_PER_IMAGE} credits.",
                    # The web extension's cost badge reads the price from here (it is in /object_info).
                    extra_dict={"credits_per_image": CREDITS_PER_IMAGE},
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip=f"What the output should show: subjects, style, colours ({PROMPT_RANGE_TEXT}).",
                ),
                io.Float.Input(
                    "control_strength",
                    default=DEFAULT_CONTROL_STRENGTH,
                    min=MIN_CONTROL_STRENGTH,
                    max=MAX_CONTROL_STRENGTH,
                    step=0.01,
                    tooltip="How closely the output follows the input's structure: 0 loosely, 1 strictly.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=MAX_SEED,
                    control_after_generate=True,
                    tooltip="Fixes the randomness. 0 lets the service pick one. In a batch, image i uses "
                    "seed + i, so a fixed seed reproduces the whole batch (and is served from the "
                    "result store instead of being paid again).",
                ),
                io.Combo.Input(
                    "output_format",
                    options=list(OUTPUT_FORMATS),
                    default=DEFAULT_OUTPUT_FORMAT,
                    tooltip="Format the service returns. png is lossless; jpeg and webp download faster.",
                ),
                io.Combo.Input(
                    "outside_limits",
                    options=OUTSIDE_LIMITS_OPTIONS,
                    default=OUTSIDE_LIMITS_OPTIONS[0],
                    tooltip=f"For an image the service cannot take as is ({LIMITS_BROKEN_TEXT}): fit it "
                    "(scale, pad) and bring the result back to the input's size, or stop with an error.",
                ),
                io.String.Input(
                    "negative_prompt",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="What the output should not show. Leave empty to send none.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="IMAGE", tooltip="The generated images, in input order, at the input's size."
                ),
                io.Int.Output(display_name="seed", tooltip="The seed the service used for the first image."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, seed: int = 0, **kwargs) -> object:
        # Seed 0 asks the service for a fresh random image each run, so never reuse an output. A fixed
        # seed's output is reused only while requests go to the same place: switching offline mode off
        # (or the service's address) must not leave the stand-in's drawing passing for the service's result.
        # A digest: ComfyUI keeps the fingerprint in the prompt, and so in every saved PNG.
        return float("nan") if seed == 0 else destination_fingerprint()

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
    async def execute(
        cls,
        image,
        prompt: str,
        control_strength: float,
        seed: int,
        output_format: str,
        outside_limits: str,
        negative_prompt: str = "",
    ) -> io.NodeOutput:
        # Async, so that ComfyUI runs other nodes (other Structure nodes, local work) while this one
        # waits on the service; the blocking work runs on a thread of the event loop's executor.
        # cls is the copy ComfyUI made for this run, so its hidden node id is this node's.
        node_id = cls.hidden.unique_id
        params = StructureParams(
            prompt=prompt,
            control_strength=control_strength,
            negative_prompt=negative_prompt or "",
            seed=seed,
            output_format=output_format,
            outside_limits=_OUTSIDE_LIMITS_MODES.get(outside_limits, outside_limits),
        )
        total = int(image.shape[0]) if len(image.shape) == 4 else 1
        bar = comfy.utils.ProgressBar(total, node_id=node_id)
        words = _Words(_user_language())
        with contextlib.ExitStack() as stack:
            run = stack.enter_context(_run_setup(words))

            def spent(credits: int) -> str:
                return words("standIn") if run.offline else words("spent", credits=credits)

            def show(progress: BatchProgress) -> None:
                bar.update_absolute(progress.done, progress.total)
                detail = words.progress(progress)
                _status(node_id, words("progress", detail=detail, spent=spent(progress.credits)))

            def work(
                should_cancel: Callable[[], bool], on_progress: Callable[[BatchProgress], None]
            ) -> BatchResult:
                return generate_images(
                    image,
                    params,
                    client=run.client,
                    store=run.store,
                    label=f"ComfyUI node {node_id}",
                    on_progress=on_progress,
                    should_cancel=should_cancel,
                )

            where = words("toStandIn") if run.offline else ""
            _status(node_id, words("sendingOne" if total == 1 else "sendingMany", count=total, where=where))
            result, torn_down = await _off_the_loop(work, show, _running_prompt_id())
            background = result.report.background
            if background is not None:
                # The requests left in flight need the client (and the stand-in) until they end.
                background.add_done_callback(stack.pop_all().close)
        if result.report.cancelled or torn_down is not None:
            left = _left_in_flight(words, result.report, run) if result.report.cancelled else ""
            _status(node_id, words("cancelled", spent=spent(result.credits)) + (f" · {left}" if left else ""))
            if result.report.in_flight:
                logging.warning(
                    "[AIThriving] node %s cancelled: %s",
                    node_id,
                    result.report.in_flight_sentence(run.store, free=run.offline),
                )
            if torn_down is not None:
                raise torn_down
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException(left or "cancelled")
        stored = words("fromStore", count=result.from_store) if result.from_store else ""
        # Answers of a stand-in (offline mode, or `serve` at AITHRIVING_BASE_URL) carry its free mark and
        # count 0 credits: fresh results that cost nothing came from one.
        free = run.offline or (result.credits == 0 and result.from_store < total)
        done = spent(result.credits) if run.offline or not free else words("freeStandIn")
        _status(node_id, words("done", total=total, stored=stored, spent=done))
        # Sent to the frontend with the "executed" message (and kept in the history): the cost shown on the
        # node.
        cost = {
            "credits": result.credits,
            "images": total,
            "from_store": result.from_store,
            "credits_per_image": 0 if free else CREDITS_PER_IMAGE,
            "seeds": result.seeds,
            "offline": run.offline,
            "free": free,
        }
        return io.NodeOutput(result.images, result.seeds[0], ui={"aithriving_cost": [cost]})


def _left_in_flight(words: _Words, report: BatchReport, run: RunSetup) -> str:
    """Return what a cancel left running, in the user's language: how many, what they may cost, where."""
    count = report.in_flight
    if not count:
        return ""
    if run.offline:
        return words("inFlightFree", count=count)
    if run.store.persistent:
        where = words("whereStore")
    else:
        where = words("whereMemoryOff") if run.store.directory is None else words("whereMemory")
    if count == 1:
        return words("inFlightOne", where=where)
    return words("inFlightMany", count=count, where=where)


async def _off_the_loop(
    work: Callable[[Callable[[], bool], Callable[[BatchProgress], None]], BatchResult],
    show: Callable[[BatchProgress], None],
    prompt_id: str | None = None,
) -> tuple[BatchResult, BaseException | None]:
    """Run ``work(should_cancel, on_progress)`` on the loop's executor; show its progress on this thread.

    Cancel reaches the work four ways: ComfyUI's interrupt flag (polled by the work), a Cancel another
    node of the same prompt took from that flag first, ComfyUI's progress hook raising when shown, and
    this task being cancelled (ComfyUI tears the prompt down when another node fails or is interrupted).
    The work then returns within about a second, and so does this; the second item is the task's
    cancellation, to raise once the node has said what it left behind.
    """
    stop = threading.Event()
    updates: queue.SimpleQueue[BatchProgress] = queue.SimpleQueue()

    loop = asyncio.get_running_loop()

    def should_cancel() -> bool:
        if stop.is_set() or _prompt_cancelled(loop, prompt_id):
            return True
        if comfy.model_management.processing_interrupted():
            _mark_cancelled(loop, prompt_id)
            return True
        return False

    # A plain future, not a task: tearing the prompt down cancels tasks, and the thread must be waited for.
    future = loop.run_in_executor(None, contextvars.copy_context().run, work, should_cancel, updates.put)
    torn_down: BaseException | None = None
    interrupted: BaseException | None = None
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
            except (Exception, _INTERRUPTED) as error:
                if isinstance(error, _INTERRUPTED):
                    # The hook reset ComfyUI's flag: the other nodes of the prompt look here.
                    _mark_cancelled(loop, prompt_id)
                stop.set()
                interrupted = interrupted or error
        if future.done():
            break
    result = future.result()
    if interrupted is not None and not isinstance(interrupted, _INTERRUPTED):
        raise interrupted  # a fault of the display itself must surface
    if interrupted is not None and not result.report.cancelled and torn_down is None:
        # The Cancel came as the last answer arrived: this node delivers what it has, and the Cancel,
        # taken from ComfyUI's flag by its hook, goes back there to stop the prompt at its next node.
        comfy.model_management.interrupt_current_processing(True)
    return result, torn_down


def _running_prompt_id() -> str | None:
    """Return the id of the prompt this node runs in (ComfyUI's executing context), None if unknown."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return getattr(context, "prompt_id", None)


def _mark_cancelled(loop: asyncio.AbstractEventLoop, prompt_id: str | None) -> None:
    """Remember that a Cancel reached this run of a prompt, so that all of its nodes stop on the one press."""
    with _CANCELLED_LOCK:
        _CANCELLED_PROMPTS.setdefault(loop, set()).add(prompt_id)


def _prompt_cancelled(loop: asyncio.AbstractEventLoop, prompt_id: str | None) -> bool:
    """Return whether a Cancel reached this run of a prompt (seen by any of its nodes)."""
    with _CANCELLED_LOCK:
        return prompt_id in _CANCELLED_PROMPTS.get(loop, ())


def _search_aliases(schema: type) -> dict[str, list[str]]:
    """Return the search_aliases argument for this server's Schema, or nothing where it lacks the field."""
    # A feature check, not a version check: the field is there or it is not.
    if dataclasses.is_dataclass(schema) and "search_aliases" in {f.name for f in dataclasses.fields(schema)}:
        return {"search_aliases": list(SEARCH_ALIASES)}
    return {}


@functools.cache
def _node_texts(language: str) -> dict[str, str]:
    """Return the node's texts in one language (empty when the pack has none in it)."""
    try:
        main = json.loads((LOCALES / language / "main.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    texts = main.get(NODE_TEXTS_KEY) if isinstance(main, dict) else None
    return dict(texts) if isinstance(texts, dict) else {}


def _user_language() -> str:
    """Return the language the user chose in ComfyUI (its Comfy.Locale setting), "en" when none is set."""
    # The node cannot tell which user queued the prompt: this is the single user's ("default") choice,
    # which is every user's when ComfyUI runs without --multi-user.
    try:
        import folder_paths  # ComfyUI's; imported here so that --base-directory is already applied

        path = Path(folder_paths.get_user_directory()) / "default" / "comfy.settings.json"
        locale = json.loads(path.read_text(encoding="utf-8")).get("Comfy.Locale")
    except (OSError, ValueError, AttributeError):
        return "en"
    valid = isinstance(locale, str) and re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]+)?", locale)
    return locale if valid else "en"


class _Words:
    """The node's texts in one language, falling back to its base language, then English."""

    def __init__(self, language: str) -> None:
        base = language.split("-")[0]
        self.english = base == "en"
        self.table = {**_node_texts("en"), **_node_texts(base), **_node_texts(language)}

    def __call__(self, key: str, **values: object) -> str:
        """Return the text of key with its {name} placeholders filled from values."""
        return re.sub(r"\{(\w+)\}", lambda match: str(values.get(match.group(1), "")), self.table[key])

    def progress(self, progress: BatchProgress) -> str:
        """Return what a progress report says: the client's own words in English, else by its stage."""
        number = (progress.index or 0) + 1
        stage_key = "stage" + progress.stage.capitalize()
        if self.english or not progress.stage:
            return progress.message
        if progress.stage == "done":
            return self("doneOf", done=progress.done, total=progress.total)
        if progress.stage == "failed":
            return self("imageFailed", number=number)
        if stage_key in self.table:
            return self("imageStage", number=number, stage=self(stage_key))
        return self("imageStage", number=number, stage=progress.stage)


@contextlib.contextmanager
def _run_setup(words: _Words) -> Iterator[RunSetup]:
    """Open this run's client (closed afterwards); a missing key names the place in ComfyUI to set one."""
    with contextlib.ExitStack() as stack:
        try:
            run = stack.enter_context(client_for_run(process_standin()))
        except MissingAPIKeyError:
            raise MissingAPIKeyError(words("noKey")) from None
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
        logging.warning(
            "[AIThriving] Could not copy %s into ComfyUI's input folder (%s); the example "
            "workflows need an image picked in their Load Image node.",
            EXAMPLE_INPUT.name,
            error.strerror or error,
        )
