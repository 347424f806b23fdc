"""Load: hundreds of requests through the batch path against a stand-in that faults ~10% of answers.

Every request carries its own seed (index + 1), so each one the stand-in recorded can be traced
to its batch item. The accounting then has to close exactly: results + failures = items, each
result at its own index and equal to what the stand-in renders for that item's image, each
request either an item's final attempt or a retry after a retryable fault, at most one paid
answer per item, and no thread or socket left behind.
"""

from __future__ import annotations

import io
import random
import time
from collections import Counter, defaultdict

import numpy as np
from PIL import Image

from structure_api import StructureClient, StructureRequest
from structure_api.batch import run_batch
from structure_api.errors import (
    BatchError,
    GenerationFailedError,
    RateLimitError,
    ResultMayBeBilledError,
    ServiceError,
)
from structure_api.images import decode_image, encode_upload
from structure_api.pipeline import StructureParams, generate_images
from structure_api.standin import (
    CREDITS_PER_IMAGE,
    Drop,
    Fault,
    Hang,
    Passthrough,
    Respond,
    StandInServer,
    Truncate,
    render_structure,
)
from structure_api.store import ResultStore

from .probes import CANARY_KEY, live_threads, message_problems, open_sockets, photo_like, settle

LOAD_ITEMS = 1000
CONCURRENCY = 8
FAULT_RATE = 0.1
FAULT_SEED = 20261124
PROMPT = "a harbour town at dawn"
STRENGTH = 0.8
# "truncate" here is always a 503 cut off mid-body: still a 503, never billed, so retried.
RETRYABLE_FAULTS = {"429", "500", "502", "503", "504", "truncate"}
MAX_ATTEMPTS = 5
# What an item's last request must have been, given how the item ended.
FINAL_FAULT_FOR_ERROR = {
    GenerationFailedError: {"code-1", "200"},  # "200": a scripted 200 answer with code -1
    ResultMayBeBilledError: {"drop", "hang"},
    ServiceError: {"500", "502", "503", "504", "truncate"},
    RateLimitError: {"429"},
}


def item_pixels(index: int) -> np.ndarray:
    """A 64x64 image of its own: its noise and a square placed by the index."""
    pixels = photo_like(64, 64, seed=index)
    x, y = 4 + (index * 7) % 36, 4 + (index * 11) % 36
    pixels[y : y + 20, x : x + 20] = (index * 37 % 256, 255 - index % 256, 128)
    return pixels


def expected_result(upload: bytes, seed: int, prompt: str = PROMPT, strength: float = STRENGTH) -> np.ndarray:
    """What the stand-in generates for this upload and seed (its rendering is deterministic)."""
    rendered = render_structure(Image.open(io.BytesIO(upload)), prompt, "", strength, seed, "png")
    return decode_image(rendered)


def account(records, outcomes: dict, errors: dict, *, items: int, seed_of=lambda i: i + 1) -> dict:
    """Trace every recorded request to its item and check the books close; returns the figures."""
    by_seed = defaultdict(list)
    for record in records:
        by_seed[int(record.fields["seed"])].append(record)
    index_of = {seed_of(i): i for i in range(items)}
    assert set(by_seed) <= set(index_of), "a request for an item that does not exist"
    figures = Counter()
    for seed, history in by_seed.items():
        index = index_of[seed]
        *earlier, last = sorted(history, key=lambda r: r.received_at)
        for record in earlier:  # every earlier attempt was a retry the policy allows after that fault
            if record.fault not in RETRYABLE_FAULTS:
                figures["unexplained_requests"] += 1
        figures["retries"] += len(earlier)
        paid = [r for r in history if r.status == 200 and r.fault in (None, "passthrough")]
        figures["paid_duplicates"] += max(0, len(paid) - 1)
        if index in outcomes:
            assert last.fault in (None, "passthrough") and last.status == 200, (index, last.fault)
            figures["succeeded"] += 1
        elif index in errors:
            allowed = FINAL_FAULT_FOR_ERROR[type(errors[index])]
            assert last.fault in allowed, (index, type(errors[index]).__name__, last.fault)
            if last.fault in RETRYABLE_FAULTS:
                assert len(history) == MAX_ATTEMPTS, "gave up on a retryable fault before the last attempt"
            figures["failed"] += 1
        else:
            figures["results_lost"] += 1
    figures["results_lost"] += sum(1 for i in range(items) if seed_of(i) not in by_seed and i not in errors)
    figures["faults"] = sum(1 for r in records if r.fault not in (None, "passthrough"))
    figures["requests"] = len(records)
    return figures


def test_1000_requests_through_run_batch_with_10_percent_faults(ledger):
    threads_before, sockets_before = live_threads(), open_sockets()
    uploads = [encode_upload(item_pixels(i)).data for i in range(LOAD_ITEMS)]
    arrivals: dict[int, list] = defaultdict(list)
    waits: list[float] = []

    def make_request(index: int) -> StructureRequest:
        return StructureRequest(
            image=encode_upload(item_pixels(index)),
            prompt=PROMPT,
            control_strength=STRENGTH,
            seed=index + 1,
            output_format="png",
        )

    def on_result(index: int, result) -> None:
        arrivals[index].append(result)

    with StandInServer(api_key=CANARY_KEY, fault_rate=FAULT_RATE, fault_seed=FAULT_SEED) as server:
        client = StructureClient(
            api_key=CANARY_KEY, base_url=server.url, sleep=waits.append, jitter=lambda: 0.5, read_timeout=30
        )
        started = time.monotonic()
        report = run_batch(client, LOAD_ITEMS, make_request, on_result=on_result, max_concurrency=CONCURRENCY)
        seconds = time.monotonic() - started
        client.close()
        records = [r for r in server.requests if r.path == "/api/control/structure"]
        credits = server.credits_spent

    # Every item exactly once: a result at its own index, or a failure with its reason.
    assert set(report.seeds).isdisjoint(report.failures)
    assert set(report.seeds) | set(report.failures) == set(range(LOAD_ITEMS))
    misplaced = 0
    for index, results in arrivals.items():
        if len(results) != 1 or results[0].seed != index + 1 or report.seeds.get(index) != index + 1:
            misplaced += 1
        elif not np.array_equal(results[0].pixels, expected_result(uploads[index], index + 1)):
            misplaced += 1
    assert set(arrivals) == set(report.seeds)
    for index, error in report.failures.items():
        assert type(error) in FINAL_FAULT_FOR_ERROR, f"item {index}: {error!r}"
        assert message_problems(str(error)) == [], str(error)

    figures = account(records, arrivals, report.failures, items=LOAD_ITEMS)
    fault_share = figures["faults"] / figures["requests"]
    threads_settled = settle(lambda: live_threads() == threads_before)
    sockets_settled = settle(lambda: open_sockets() == sockets_before)
    threads_after, sockets_after = live_threads(), open_sockets()
    reasons = Counter(type(e).__name__ for e in report.failures.values())
    fault_kinds = Counter(r.fault for r in records if r.fault)

    ledger.count("load_items", LOAD_ITEMS)
    ledger.count("load_requests_seen", figures["requests"])
    ledger.count("faults_survived", figures["faults"])
    ledger.count("results_lost", figures["results_lost"])
    ledger.count("results_misplaced", misplaced)
    ledger.count("paid_duplicates", figures["paid_duplicates"])
    ledger.count("unexplained_requests", figures["unexplained_requests"])
    ledger.count("threads_leaked", max(0, len(threads_after) - len(threads_before)))
    ledger.count("sockets_leaked", max(0, sockets_after - sockets_before))
    ledger.fact("_load_concurrency", CONCURRENCY)
    ledger.fact(
        "load run (run_batch)",
        (
            f"{LOAD_ITEMS} items, concurrency {CONCURRENCY}, {figures['requests']} requests in {seconds:.1f} "
            f"s ({figures['requests'] / seconds:.0f}/s); faults injected {figures['faults']} "
            f"({fault_share:.1%}: {dict(sorted(fault_kinds.items()))}); retries {figures['retries']} (waits "
            f"{sum(waits):.0f} s injected, not slept); succeeded {figures['succeeded']}, failed "
            f"{figures['failed']} {dict(reasons)}; credits {credits}; threads {len(threads_before)} -> "
            f"{len(threads_after)}, sockets {sockets_before} -> {sockets_after}"
        ),
    )
    ledger.row(
        "load",
        f"{LOAD_ITEMS} items through run_batch, concurrency {CONCURRENCY}, "
        f"stand-in faulting {FAULT_RATE:.0%} of answers at random",
        "each item's result at its index (pixels equal to the stand-in's rendering of that item) or a "
        "typed failure; requests = results + failures + retries; no paid duplicate; no leak",
        f"{figures['succeeded']} results in place, {figures['failed']} failures {dict(reasons)}, "
        f"{figures['retries']} retries, {figures['requests']} requests = {figures['succeeded']} + "
        f"{figures['failed']} + {figures['retries']}; lost {figures['results_lost']}, misplaced {misplaced}, "
        f"paid duplicates {figures['paid_duplicates']}, unexplained {figures['unexplained_requests']}",
        requests=figures["requests"],
        waited=sum(waits),
        seconds=seconds,
    )

    assert figures["results_lost"] == 0 and misplaced == 0
    assert figures["unexplained_requests"] == 0 and figures["paid_duplicates"] == 0
    assert figures["requests"] == figures["succeeded"] + figures["failed"] + figures["retries"]
    assert figures["succeeded"] == len(report.seeds) and figures["failed"] == len(report.failures)
    assert credits == CREDITS_PER_IMAGE * figures["succeeded"] == report.credits
    assert 0.06 < fault_share < 0.14, fault_share
    assert figures["requests"] >= 500
    assert threads_settled, f"threads left: {sorted(set(threads_after) - set(threads_before))}"
    assert sockets_settled, f"sockets: {sockets_before} before, {sockets_after} after"
    assert seconds < 90


def _mixed_faults(count: int, rng: random.Random) -> list[Fault]:
    """Answers for the first ``count`` requests: normal, or (10%) a fault of any kind, transport ones
    included."""
    kinds = [
        Respond(429, headers={"Retry-After": "2"}),
        Respond(500),
        Respond(502),
        Respond(503),
        Respond(504),
        Respond(200, body={"code": -1, "message": "Generation failed, please try again."}),
        Drop(),
        Truncate(status=503),
        Hang(),
    ]
    labelled = []
    for _ in range(count):
        labelled.append(rng.choice(kinds) if rng.random() < FAULT_RATE else Passthrough())
    return labelled


def test_node_path_under_mixed_faults_loses_nothing_thanks_to_the_result_store(tmp_path, ledger):
    """generate_images (the node's logic) with transport faults too; a re-run fetches only what failed.

    A batch with any failure raises BatchError (the node shows one error); the results already paid
    for are not lost, because a fixed seed puts them in the result store and the re-run takes them from there.
    """
    count = 120
    threads_before, sockets_before = live_threads(), open_sockets()
    batch = np.stack([item_pixels(1000 + i) for i in range(count)]).astype(np.float32) / 255
    uploads = [encode_upload(item_pixels(1000 + i)).data for i in range(count)]
    params = StructureParams(prompt=PROMPT, control_strength=STRENGTH, seed=5000, output_format="png")
    store = ResultStore(tmp_path / "cache")
    waits: list[float] = []
    rng = random.Random(FAULT_SEED)
    with StandInServer(api_key=CANARY_KEY) as server:
        server.script(*_mixed_faults(2 * count, rng))
        client = StructureClient(
            api_key=CANARY_KEY, base_url=server.url, sleep=waits.append, jitter=lambda: 0.5, read_timeout=0.5
        )
        started = time.monotonic()
        try:
            first = generate_images(batch, params, client=client, store=store, max_concurrency=CONCURRENCY)
            failures = {}
        except BatchError as error:
            first, failures = None, error.failures
        first_records = [r for r in server.requests if r.path == "/api/control/structure"]
        server.clear()
        second = generate_images(batch, params, client=client, store=store, max_concurrency=CONCURRENCY)
        seconds = time.monotonic() - started
        second_records = server.requests
        client.close()

    def seed_of(i: int) -> int:
        return 5000 + i

    succeeded_first = {i: None for i in range(count) if i not in failures}
    figures = account(first_records, succeeded_first, failures, items=count, seed_of=seed_of)
    # The re-run sends exactly the failed items, once each, and takes the rest from the result store.
    resent = sorted(int(r.fields["seed"]) - 5000 for r in second_records)
    misplaced = sum(
        1
        for i in range(count)
        if not np.array_equal(
            np.rint(np.asarray(second.images[i]) * 255).astype(np.uint8),
            expected_result(uploads[i], seed_of(i)),
        )
    )
    threads_settled = settle(lambda: live_threads() == threads_before)
    sockets_settled = settle(lambda: open_sockets() == sockets_before)
    reasons = Counter(type(e).__name__ for e in failures.values())
    kinds = Counter(r.fault for r in first_records if r.fault not in (None, "passthrough"))

    ledger.count("faults_survived", figures["faults"])
    ledger.count("results_lost", figures["results_lost"])
    ledger.count("results_misplaced", misplaced)
    ledger.count("paid_duplicates", figures["paid_duplicates"])
    ledger.count("unexplained_requests", figures["unexplained_requests"])
    ledger.count("threads_leaked", 0 if threads_settled else 1)
    ledger.count("sockets_leaked", 0 if sockets_settled else 1)
    ledger.fact(
        "load run (node path, mixed faults)",
        (
            f"{count} images through generate_images, faults {dict(sorted(kinds.items()))}, first run "
            f"{len(first_records)} requests, {len(failures)} items failed {dict(reasons)}; re-run sent "
            f"{len(resent)} requests (the failed items only), {second.from_store} from the result store; "
            f"{seconds:.1f} s"
        ),
    )
    ledger.row(
        "load",
        f"{count} images through generate_images (the node's logic) with 10% mixed faults incl. "
        "dropped, cut-off and hung answers; then the same run again",
        "first run: BatchError naming each failed image, the rest paid once and kept; re-run: only the "
        "failed images are sent; every image at its index",
        f"first run {len(first_records)} requests, {len(failures)} failed {dict(reasons)}; re-run sent "
        f"{len(resent)}, {second.from_store} from the result store; lost {figures['results_lost']}, "
        f"misplaced {misplaced}, paid duplicates {figures['paid_duplicates']}",
        requests=len(first_records) + len(second_records),
        waited=sum(waits),
        seconds=seconds,
    )

    assert first is None or not failures
    assert figures["results_lost"] == 0 and figures["unexplained_requests"] == 0
    assert figures["paid_duplicates"] == 0
    assert figures["requests"] == figures["succeeded"] + figures["failed"] + figures["retries"]
    assert resent == sorted(failures), "the re-run must send exactly the items that failed"
    assert second.from_store == count - len(failures)
    assert second.seeds == [seed_of(i) for i in range(count)]
    assert misplaced == 0
    assert threads_settled and sockets_settled
    assert seconds < 60
