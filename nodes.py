"""ComfyUI node "Structure (AIThriving)": schema, then one call into structure_api."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

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
from .structure_api.offline import (
    LOCAL_LABEL, RunSetup, client_for_run, destination_fingerprint, process_standin)
from .structure_api.pipeline import StructureParams, generate_images

CATEGORY = "image/AIThriving"
# The picture the example workflows (the template browser's entries) load with LoadImage.
EXAMPLE_INPUT = Path(__file__).resolve().parent / "example_workflows" / "structure_example.png"
OUTSIDE_LIMITS_OPTIONS = ["fit and restore size", "fail"]
_OUTSIDE_LIMITS_MODES = {"fit and restore size": "fit", "fail": "fail"}


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
    def execute(cls, image, prompt: str, control_strength: float, seed: int, output_format: str,
                outside_limits: str, negative_prompt: str = "") -> io.NodeOutput:
        node_id = cls.hidden.unique_id
        params = StructureParams(
            prompt=prompt, control_strength=control_strength, negative_prompt=negative_prompt or "",
            seed=seed, output_format=output_format,
            outside_limits=_OUTSIDE_LIMITS_MODES.get(outside_limits, outside_limits))
        total = int(image.shape[0]) if len(image.shape) == 4 else 1
        bar = comfy.utils.ProgressBar(total, node_id=node_id)
        with _run_setup() as run:
            def spent(credits: int) -> str:
                return LOCAL_LABEL if run.local else f"{credits} credits spent"

            def show(progress: BatchProgress) -> None:
                bar.update_absolute(progress.done, progress.total)
                _status(node_id, f"{progress.message} · {spent(progress.credits)}")

            where = f" to the {LOCAL_LABEL}" if run.local else ""
            _status(node_id, f"sending {total} image{'s' if total != 1 else ''}{where}…")
            result = generate_images(
                image, params, client=run.client, store=run.store, label=f"ComfyUI node {node_id}",
                on_progress=show, should_cancel=comfy.model_management.processing_interrupted)
        if result.report.cancelled:
            _status(node_id, f"cancelled · {spent(result.credits)}")
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException()
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
