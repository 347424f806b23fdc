"""Run by ComfyUI's own Python in its checkout: the node's Cancel path against this ComfyUI's interrupt code.

``python cancel_probe.py <folder holding the pack as aithriving_probe>`` prints one JSON object:

- ``four``: four node runs of one prompt, whose Cancel ComfyUI's progress hook takes (and resets) before
  any run's work looks at the flag: for each run, how it ended, seconds after the Cancel, and whether
  its work had ended when it returned; ``flag_after``: ComfyUI's interrupt flag afterwards.
- ``last_answer``: a run whose work is complete when the hook takes the Cancel: how it ended, and
  whether the Cancel went back to ComfyUI's flag (so the prompt still stops).
- ``next_prompt``: a later run under the first prompt's id, with the flag clear: how it ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time


def main() -> None:
    # ComfyUI's checkout (the working folder) and the pack, importable as its main.py sees them.
    sys.path[:0] = [os.getcwd(), sys.argv[1]]
    import comfy.options

    # On ComfyUI's CPU path, as the servers of the other tests (its arguments are read on import).
    sys.argv[1:] = ["--cpu"]
    comfy.options.enable_args_parsing()
    # ComfyUI's own "utils" package, bound before anything can take the name (main.py does the same).
    import utils.extra_config  # noqa: F401
    from aithriving_probe import nodes
    from aithriving_probe.structure_api.batch import BatchReport
    from aithriving_probe.structure_api.pipeline import BatchResult

    import comfy.model_management as mm
    import comfy.utils

    hook_took_it = threading.Event()

    def hook(*args: object, **kwargs: object) -> None:
        # What ComfyUI's own progress hook does first (main.py, hijack_progress): take the Cancel, raise.
        try:
            mm.throw_exception_if_processing_interrupted()
        except BaseException:
            hook_took_it.set()
            raise

    comfy.utils.set_progress_bar_global_hook(hook)
    ended: dict[str, float] = {}

    def work_of(name: str, seconds: float, polls: bool = True):
        def work(should_cancel, on_progress):
            report = BatchReport(total=1)
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                on_progress(name)
                # Only once the hook has taken the Cancel: the flag is clear by then, as it is for the
                # nodes that come second to a Cancel in ComfyUI.
                if polls and hook_took_it.is_set() and should_cancel():
                    report.cancelled = True
                    break
                time.sleep(0.01)
            on_progress(name)
            ended[name] = time.monotonic()
            return BatchResult(images=None, seeds=[0], credits=0, from_store=0, report=report)

        return work

    async def run(name: str, prompt_id: str, seconds: float, polls: bool = True) -> tuple[str, float, bool]:
        def show(progress: object) -> None:
            # A new bar each time: ComfyUI 0.33 calls its hook for a bar's first update at once (later
            # ones only when the value moved).
            comfy.utils.ProgressBar(2).update_absolute(1)

        try:
            result, torn_down = await nodes._off_the_loop(work_of(name, seconds, polls), show, prompt_id)
            outcome = "cancelled" if result.report.cancelled else "finished"
        except BaseException as error:  # what escaped the node's own handling
            outcome = f"raised {type(error).__name__}"
        return outcome, time.monotonic(), name in ended

    async def four() -> dict:
        async def cancel() -> float:
            await asyncio.sleep(0.5)
            mm.interrupt_current_processing(True)
            return time.monotonic()

        *runs, pressed = await asyncio.gather(
            *(run(f"node {n}", "probe-prompt-1", 8.0) for n in range(4)), cancel(), return_exceptions=True
        )
        return {
            "runs": [
                {"outcome": r[0], "seconds": round(r[1] - pressed, 3), "work_ended": r[2]}
                if isinstance(r, tuple)
                else {"outcome": f"raised {type(r).__name__}"}
                for r in runs
            ],
            "flag_after": mm.processing_interrupted(),
        }

    report = {"four": asyncio.run(four())}
    mm.interrupt_current_processing(False)
    hook_took_it.clear()
    mm.interrupt_current_processing(True)  # pressed as the last answer arrives
    outcome, _, work_ended = asyncio.run(run("last", "probe-prompt-2", 0.0, polls=False))
    report["last_answer"] = {"outcome": outcome, "flag_after": mm.processing_interrupted()}
    mm.interrupt_current_processing(False)  # ComfyUI clears it as the next prompt starts
    # The next run, under the id of the cancelled one (a client may send its own prompt ids).
    outcome, _, _ = asyncio.run(run("next", "probe-prompt-1", 0.3))
    report["next_prompt"] = {"outcome": outcome}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
