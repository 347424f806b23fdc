"""Where the command's requests go (RequestTarget), and writing each paid result to its file."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from ..client import StructureClient, StructureResult
from ..contract import FIELD_NAMES, validate_form
from ..errors import InputError, StructureError
from ..files import FileAccessError, InputImage, result_file_bytes, write_atomically
from ..paid import deliver, fetch_or_pay, release
from ..request import StructureRequest
from ..store import ResultStore
from .exits import UsageError


class RequestTarget:
    """Where requests go (the paid service, or a stand-in in this process) and the store that keeps them."""

    def __init__(self, client: StructureClient, store: ResultStore, *, free: bool = False) -> None:
        self.client = client
        self.store = store
        self.free = free  # a stand-in: nothing it does can cost anything

    @classmethod
    @contextlib.contextmanager
    def open(cls, args: argparse.Namespace) -> Iterator[RequestTarget]:
        """Open the target the options choose: ``--offline``'s in-process stand-in, else the service."""
        if args.offline:
            from ..standin import StandInServer

            # free=True: its answers say so, and the client counts them as 0 credits.
            with StandInServer(free=True) as server:
                print(f"using the stand-in at {server.url} (no key, no credits)", file=sys.stderr)
                with StructureClient(
                    api_key="stand-in", base_url=server.url, read_timeout=args.timeout
                ) as client:
                    # Kept for this run only: the next run's stand-in has another address anyway.
                    yield cls(client, ResultStore(None), free=True)
            return
        with StructureClient.from_env(read_timeout=args.timeout) as client:
            yield cls(client, ResultStore(None) if args.no_store else ResultStore.from_env())

    def generate(self, request: StructureRequest, label: str) -> tuple[StructureResult, bool]:
        """Send one request through the store: a result paid and not delivered (or a fixed seed's) is free."""
        paid = fetch_or_pay(self.client, request, self.store, label=label)
        assert paid is not None  # only claim_only can come back empty
        return paid.result, paid.from_store

    def delivered(self, result: StructureResult) -> None:
        """Mark the result delivered (its file is written): the store stops offering it."""
        deliver(self.store, result.stored)

    def undelivered(self, result: StructureResult) -> None:
        """Give the result back (its file was not written): the store offers it again."""
        release(self.store, result.stored)

    def kept_sentence(self, result: StructureResult) -> str:
        """Say what became of a result maybe paid for but not written: every word true."""
        entry = result.stored
        if result.attempts == 0 and entry is not None and entry.free:
            paid = "it was made free by a stand-in in an earlier run"
        elif result.attempts == 0:  # served by the store: no request was made this time
            paid = "it was paid for in an earlier run"
        elif result.credits:
            paid = f"it was paid for ({result.credits} credits)"
        else:
            paid = "it was free (a stand-in)"
        if entry is not None and self.store.on_disk(entry):
            return (
                f"{paid} and is kept in the result store ({self.store.directory}): "
                "`structure-api results --export DIR` writes it out, and running the same command again "
                "delivers it without paying"
            )
        if entry is not None:
            return (
                f"{paid} and is kept in memory only ({self.store.memory_reason}), so it is "
                f"lost when this command ends; its seed was {result.seed}"
            )
        return f"{paid} and was not kept; its seed was {result.seed}"


def write_result(
    path: Path, image: InputImage, result: StructureResult, output_format: str, target: RequestTarget
) -> None:
    try:
        write_atomically(path, result_file_bytes(result.pixels, result.data, image, output_format))
    except (OSError, StructureError) as error:
        target.undelivered(result)
        reason = (
            (error.strerror or type(error).__name__) if isinstance(error, OSError) else str(error).rstrip(".")
        )
        raise FileAccessError(
            f"Could not write {path} ({reason}) after the service answered; {target.kept_sentence(result)}."
        ) from None
    target.delivered(result)


def form_values(args: argparse.Namespace, seed: int, output_format: str) -> dict[str, object]:
    """Collect the form's values from the command line: each of the contract's FORM_FIELDS is the option of
    the same name, but the seed (each image's own) and the format (--format or the output file's suffix)."""
    given = {"seed": seed, "output_format": output_format}
    return {name: given[name] if name in given else getattr(args, name) for name in FIELD_NAMES}


def check_params(args: argparse.Namespace, output_format: str) -> None:
    try:
        validate_form(form_values(args, args.seed, output_format))
    except InputError as error:
        raise UsageError(str(error)) from None


def structure_request(
    args: argparse.Namespace, image: InputImage, seed: int, output_format: str
) -> StructureRequest:
    return StructureRequest(image=image.upload, **form_values(args, seed, output_format))


def credits_text(result: StructureResult, from_store: bool) -> str:
    if from_store:
        return "0 credits (kept from an earlier run)"
    return f"{result.credits} credits" if result.credits else "0 credits (free stand-in)"
