"""The paid-result protocol, owned here: claim, lock, pay, keep, decode or discard, hand out, deliver.

Every caller (the node's pipeline, ``run_batch``, the CLI) gets its results through
:func:`fetch_or_pay`, and nothing else touches the result store on the paid path::

    fetch_or_pay(client, request, store)
      claim    the store holds one: a fixed seed's every time; seed 0's each undelivered one once,
               claimed under the key's cross-process lock, so two processes never get the same one
      pay      under the key's lock (a fixed seed: claim again first), client.generate: HTTP only,
               returns the checked, undecoded answer
      keep     its bytes in the store (a seed-0 answer also under the seed it got), in this thread,
               before anything decodes them; an unusable image rides on the error and is kept too
      decode   bytes that do not decode are discarded, and the error says it may have been charged
    -> PaidResult, handed out to the caller until deliver() (written, returned) or release()
       (the caller gave up: a re-run takes it); ``with`` delivers on success, releases on error
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .answers import ImageAnswer, StructureResult, decode_answer
from .contract import MAX_SEED
from .errors import MalformedResponseError, StructureError
from .images import decode_image
from .request import StructureRequest
from .store import ResultStore, StoredResult

if TYPE_CHECKING:  # only the type: the client is passed in by the caller
    from .client import ProgressEvent, StructureClient

# The key prefix of an image kept but not fit to use: listed and exported, never served for a request.
UNFIT_PREFIX = "unfit-"


@dataclass
class PaidResult:
    """A result handed out to its caller: ``deliver()`` once it reached the user, else ``release()``."""

    result: StructureResult
    from_store: bool  # True: served by the result store, free; False: paid (or free from a stand-in) now
    store: ResultStore

    @property
    def entry(self) -> StoredResult | None:
        """The store's entry for this result (None only when it could not be kept)."""
        return self.result.stored  # type: ignore[return-value]

    def deliver(self) -> None:
        """Record that the result reached the user (written, returned): the store stops offering it."""
        deliver(self.store, self.entry)

    def release(self) -> None:
        """Give the result back undelivered: a re-run (or ``structure-api results``) takes it."""
        release(self.store, self.entry)

    def use(self, consume: Callable[[StructureResult], None]) -> None:
        """Run ``consume(result)``; bytes that turn out not to decode are discarded from the store."""
        try:
            consume(self.result)
        except MalformedResponseError:
            discard(self.store, self.entry)  # unusable bytes would only be served again
            raise

    def __enter__(self) -> PaidResult:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if kind is None:
            self.deliver()
        else:
            self.release()


def deliver(store: ResultStore, entry: StoredResult | None) -> None:
    """Mark ``entry`` delivered (no-op for None)."""
    if entry is not None:
        store.mark_delivered(entry)


def release(store: ResultStore, entry: StoredResult | None) -> None:
    """Hand ``entry`` back undelivered (no-op for None)."""
    if entry is not None:
        store.release(entry)


def discard(store: ResultStore, entry: StoredResult | None) -> None:
    """Remove ``entry``, whose bytes are unusable (no-op for None)."""
    if entry is not None:
        store.discard(entry)


def fetch_or_pay(
    client: StructureClient,
    request: StructureRequest,
    store: ResultStore,
    *,
    label: str = "",
    on_progress: Callable[[ProgressEvent], None] | None = None,
    cancel: threading.Event | None = None,
    claim_only: bool = False,
    decode: bool = True,
) -> PaidResult | None:
    """Return the store's result for ``request`` (free), else pay for one and keep it before its decode.

    None only with ``claim_only`` when the store holds nothing. ``decode=False`` leaves ``pixels``
    None, for a caller that decodes ``data`` itself (inside :meth:`PaidResult.use`).
    """
    request.validate()
    key = store.key_for(request, client.endpoint)
    if request.seed == 0:
        # Handed out once across processes: claimed under the same lock paying uses.
        hit = _claim(store, key, 0, decode, lock=True)
        if hit is not None or claim_only:
            return hit
        # Random means random: identical seed-0 requests of one batch are paid side by side.
        return _pay(client, request, store, key, label, on_progress, cancel, decode)
    hit = _claim(store, key, request.seed, decode)
    if hit is not None or claim_only:
        return hit
    with store.paying(key):
        # Another thread or process may have paid for it while this one waited for the lock.
        hit = _claim(store, key, request.seed, decode)
        if hit is not None:
            return hit
        return _pay(client, request, store, key, label, on_progress, cancel, decode)


def _claim(store: ResultStore, key: str, seed: int, decode: bool, *, lock: bool = False) -> PaidResult | None:
    """Return one of the store's results for ``key``, decoded; entries that do not decode are discarded.

    ``lock``: claim under the key's cross-process lock (decoding outside it).
    """
    while True:
        if lock:
            with store.paying(key):
                entry = store.claim(key, seed)
        else:
            entry = store.claim(key, seed)
        if entry is None:
            return None
        try:
            pixels = decode_image(entry.data) if decode else None
        except StructureError:
            store.discard(entry)  # unusable: never served again
            continue
        result = StructureResult(
            pixels=pixels,
            data=entry.data,
            seed=entry.seed,
            format=entry.format,
            request_id=None,
            attempts=0,
            credits=0,
            stored=entry,
        )
        return PaidResult(result, True, store)


def _pay(
    client: StructureClient,
    request: StructureRequest,
    store: ResultStore,
    key: str,
    label: str,
    on_progress: Callable[[ProgressEvent], None] | None,
    cancel: threading.Event | None,
    decode: bool,
) -> PaidResult:
    """Pay for ``request``, keep the answer, then decode it: the keep comes before anything can drop it."""
    try:
        answer = client.generate(request, on_progress=on_progress, cancel=cancel)
    except MalformedResponseError as error:
        if isinstance(error.answer, ImageAnswer):
            # An image not fit to use here: kept undelivered under a key no request has, so a re-run
            # never serves it but `structure-api results --export` writes it out.
            entry = store.keep(
                UNFIT_PREFIX + key,
                error.answer.data,
                seed=error.answer.seed,
                format=error.answer.format,
                label=label,
                free=error.answer.credits == 0,
            )
            store.release(entry)
            where = (
                f"it is kept in the result store ({store.directory}), where `structure-api results "
                "--export DIR` writes it out"
                if store.on_disk(entry)
                else "it is kept in memory only (the result store is off or cannot be written)"
            )
            raise MalformedResponseError(
                f"{error.message.rstrip('.')}; {where}.",
                http_status=error.http_status,
                headers=error.headers,
                request_id=error.request_id,
            ) from None
        raise
    entry = keep(store, request, answer, key, client.endpoint, label)
    try:
        pixels = decode_answer(answer) if decode else None
    except MalformedResponseError:
        store.discard(entry)  # unusable bytes would only be served again
        raise
    result = StructureResult(
        pixels=pixels,
        data=answer.data,
        seed=answer.seed,
        format=answer.format,
        request_id=answer.request_id,
        attempts=answer.attempts,
        credits=answer.credits,
        stored=entry,
    )
    return PaidResult(result, False, store)


def keep(
    store: ResultStore, request: StructureRequest, answer: ImageAnswer, key: str, endpoint: str, label: str
) -> StoredResult:
    """Keep ``answer``'s bytes under ``key``; a seed-0 answer with a known seed also answers it fixed."""
    aliases = ()
    if request.seed == 0 and answer.seed_known and 1 <= answer.seed <= MAX_SEED:
        aliases = (store.key_for(dataclasses.replace(request, seed=answer.seed), endpoint),)
    return store.keep(
        key,
        answer.data,
        seed=answer.seed,
        format=answer.format,
        label=label,
        aliases=aliases,
        free=answer.credits == 0,
    )
