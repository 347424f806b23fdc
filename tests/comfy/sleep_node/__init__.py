"""A test-only ComfyUI node standing for local work (a sampler on the GPU): it holds the executor for a while.

Linked into custom_nodes only by tests/comfy/test_nodes_overlap.py; never part of the pack.
"""

import time


class AIThrivingTestSleep:
    """Passes the image through after ``seconds`` of blocking work, as a synchronous local node does."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "seconds": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 60.0, "step": 0.1}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, image, seconds):
        started = time.monotonic()
        time.sleep(seconds)  # synchronous on purpose: ComfyUI runs it inline, holding the event loop
        # The machine's monotonic clock, which the test process shares: when the local work really ran.
        print(f"AIThrivingTestSleep ran from {started:.6f} to {time.monotonic():.6f}", flush=True)
        return (image,)


NODE_CLASS_MAPPINGS = {"AIThrivingTestSleep": AIThrivingTestSleep}
