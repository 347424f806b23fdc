"""Hostile Retry-After values mid-batch: capped or ignored, never a crash, every paid answer kept."""

from __future__ import annotations

import math
import time

from structure_api import StructureClient, StructureRequest
from structure_api.batch import run_batch
from structure_api.images import encode_upload
from structure_api.ratelimit import Pacer
from structure_api.retry import RetryPolicy
from structure_api.standin import Passthrough, Respond, StandInServer
from support import RecordingSleep

from .probes import CANARY_KEY, photo_like

# What a broken proxy or a hostile server could put in Retry-After. Before the fix, "inf" and
# "1e999" made the client's message arithmetic raise OverflowError out of the worker, which
# ended the whole batch and threw away the answers already paid for.
HOSTILE = [
    "inf",
    "-inf",
    "nan",
    "1e999",
    "99999999999999999999999999999",
    "-5",
    "garbage",
    "²",
    "¹²",
    "9" * 2000,
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 01 Jan 0001 00:00:00 GMT",
    "Wed, 32 Foo 2020 25:61:61 GMT",
    "0x10",
]
IMAGES = 3 + len(HOSTILE)  # every scripted answer is used: 3 paid first, then a 429 before each other


def test_a_batch_survives_any_retry_after_and_keeps_every_paid_answer(ledger):
    uploads = [encode_upload(photo_like(96, 64, seed=i)) for i in range(IMAGES)]
    waits = RecordingSleep()
    delivered: dict[int, int] = {}
    # Paid answers first, then the hostile 429s interleaved with more paid answers.
    script = [Passthrough()] * 3
    for value in HOSTILE:
        script += [Respond(429, headers={"Retry-After": value}), Passthrough()]
    with StandInServer(api_key=CANARY_KEY) as server:
        server.script(*script)
        client = StructureClient(
            api_key=CANARY_KEY,
            base_url=server.url,
            sleep=waits,
            clock=waits.clock,
            jitter=lambda: 0.5,
            pacer=Pacer(None, clock=waits.clock),
        )
        started = time.monotonic()
        report = run_batch(
            client,
            IMAGES,
            lambda i: StructureRequest(image=uploads[i], prompt="a lighthouse", seed=i + 1),
            on_result=lambda i, result: delivered.__setitem__(i, result.credits),
            max_concurrency=4,
        )
        seconds = time.monotonic() - started
        client.close()
        statuses = [r.status for r in server.requests]
        paid = server.credits_spent
    observed = (
        f"{report.done} of {IMAGES} delivered, {statuses.count(429)} 429s waited out "
        f"(longest wait {max(waits.calls):.1f} s), credits paid {paid}, delivered {sum(delivered.values())}"
    )
    ledger.row(
        "faults",
        f"429s with {len(HOSTILE)} hostile Retry-After values (inf, 1e999, NaN, garbage, dates in "
        f"year 1 and 9999, ...) in a batch of {IMAGES} at 4 in flight",
        "each value capped (to 90 s) or ignored (backoff instead); the batch completes; credits paid = "
        "credits delivered",
        observed,
        requests=len(statuses),
        waited=waits.total,
        seconds=seconds,
    )
    assert report.failures == {} and report.done == IMAGES and not report.cancelled
    assert statuses.count(429) == len(HOSTILE) and statuses.count(200) == IMAGES
    # Money: every answer paid for reached the caller, none was paid twice.
    assert paid == 6 * IMAGES == report.credits == sum(delivered.values())
    assert sorted(delivered) == list(range(IMAGES))
    policy = RetryPolicy()
    assert all(math.isfinite(w) and 0 <= w <= policy.max_retry_after + 5.0 for w in waits.calls)
