"""A stand-in for the Structure endpoint: same contract, generated images, scriptable faults.

It serves ``POST /api/control/structure`` on loopback so workflows can be tried offline without
spending credits, and so tests can talk real HTTP to something that can also misbehave on cue
(``StandInServer.script(Respond(503), Drop(), ...)``, the fault types in ``faults``). The images it
returns are not AI generations: they are the input's edge map painted in two colours derived from
the prompt and seed, so the structure is visibly kept.

Where each part lives: ``server`` (start, stop, connections, the normal answer), ``handler`` (one
request: read, recorded, answered or a fault played), ``records`` (recorded requests, queued faults,
credits), ``multipart`` and
``validation`` (reading an upload as the service does, with the figures of ``structure_api.contract``),
``render`` (the generated image), ``bodies`` (error bodies), ``upstream_limit`` (the upstream's rate limit
and lock-out), ``faults`` (what only tests script), ``run`` (``serve``, what users run).
"""

from ..contract import CREDITS_PER_IMAGE, ENDPOINT_PATH, STANDIN_HEADER, STANDIN_HEADER_VALUE
from .bodies import default_body, error_payload
from .faults import (
    FAULT_KINDS,
    Drop,
    DropBeforeRead,
    Exchange,
    Fault,
    GenerationFailed,
    Hang,
    Passthrough,
    Raw,
    Respond,
    Stream,
    Truncate,
)
from .handler import HEALTH_PATHS
from .multipart import parse_multipart
from .records import RecordedRequest
from .render import edge_map, render_structure, structure_edges
from .run import serve
from .server import StandInServer
from .validation import decode_upload, form_to_job

_RENAMED = {"validate_form": "form_to_job"}  # old spelling: new name, for one release


def __getattr__(name: str) -> object:
    """Answer an old spelling of a name with the new name's object, and warn."""
    if name in _RENAMED:
        from .._renamed import warn_renamed

        warn_renamed(f"structure_api.standin.{name}", f"structure_api.standin.{_RENAMED[name]}")
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Fault",
    "Respond",
    "GenerationFailed",
    "Truncate",
    "Stream",
    "Drop",
    "DropBeforeRead",
    "Hang",
    "Passthrough",
    "Raw",
    "Exchange",
    "RecordedRequest",
    "StandInServer",
    "serve",
    "ENDPOINT_PATH",
    "FAULT_KINDS",
    "CREDITS_PER_IMAGE",
    "HEALTH_PATHS",
    "STANDIN_HEADER",
    "STANDIN_HEADER_VALUE",
    "default_body",
    "error_payload",
    "parse_multipart",
    "edge_map",
    "render_structure",
    "structure_edges",
    "decode_upload",
    "form_to_job",
]
