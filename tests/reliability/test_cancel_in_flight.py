"""Cancel keeps what the service is charging for (issue 20, item 1), in the node's own path.

A cancel after the uploads finished used to drop the answers the service went on to make and charge
for; a re-run paid again. Each test here cancels a batch whose uploads are complete, lets the
stand-in finish (and charge), re-runs the same batch and writes one row of the credits table:
re-paid must be 0, with a fixed seed and with seed 0. ComfyUI's own Cancel of the same path is in
tests/comfy/test_nodes_overlap.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from structure_api import StructureClient
from structure_api.pipeline import StructureParams, generate_images
from structure_api.standin import CREDITS_PER_IMAGE, StandInServer
from structure_api.store import ResultStore

from .probes import CANARY_KEY, photo_like


def _batch(count: int) -> np.ndarray:
    return np.stack([photo_like(96, 64, seed=700 + i) for i in range(count)]).astype(np.float32) / 255


@pytest.mark.parametrize("seed", [7100, 0], ids=["fixed seed", "seed 0"])
def test_cancel_after_the_uploads_then_the_same_batch_again_repays_nothing(tmp_path, ledger, seed):
    images = _batch(6)
    params = StructureParams(prompt="a harbour at dawn", seed=seed)
    store = ResultStore(tmp_path / "store")
    with StandInServer(api_key=CANARY_KEY, latency=1.5) as server:
        with StructureClient(api_key=CANARY_KEY, base_url=server.url) as client:
            cancel_at = time.monotonic() + 0.6
            started = time.monotonic()
            first = generate_images(
                images,
                params,
                client=client,
                store=store,
                max_concurrency=6,
                should_cancel=lambda: time.monotonic() >= cancel_at,
            )
            returned = time.monotonic() - started
            assert first.report.cancelled and first.report.in_flight == 6 and returned < 1.6, returned
            sentence = first.report.in_flight_sentence(store)
            assert first.report.background.wait(10) and first.report.background.kept == 6
        paid = server.credits_spent
        with StructureClient(api_key=CANARY_KEY, base_url=server.url) as client:
            again = generate_images(images, params, client=client, store=store, max_concurrency=6)
        repaid = server.credits_spent - paid
    ledger.row(
        "credits",
        f"Cancel a batch of 6 after its uploads finished ({'seed 0' if seed == 0 else 'fixed seed'}), "
        "then the same batch again",
        "control back within a second; the 6 answers finish in the background and are kept; the "
        "status says 6 may be charged and are kept; the re-run pays nothing",
        f"returned after {returned:.2f} s: '{sentence[:90]}...'; re-run: {again.from_store} of 6 from "
        f"the store, {again.credits} credits",
        paid=paid,
        delivered=CREDITS_PER_IMAGE * 6,
        repaid=repaid,
    )
    assert paid == 6 * CREDITS_PER_IMAGE and repaid == 0
    assert again.from_store == 6 and again.credits == 0 and not store.undelivered()
