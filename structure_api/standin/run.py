"""`structure-api serve`: the free stand-in users run, until Ctrl-C."""

from __future__ import annotations

from collections.abc import Callable

from ..contract import LOCKOUT_SECONDS
from ..ratelimit import RateLimit
from .server import StandInServer


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    latency: float = 0.0,
    ready: Callable[[str], None] | None = None,
    rate_limit: RateLimit | str | None = None,
    lockout: float = LOCKOUT_SECONDS,
) -> StandInServer:
    """Run the stand-in until interrupted (Ctrl-C), calling ready(url) once listening; return it, stopped."""
    # Nobody reads the records of a long-running stand-in, and each would hold an upload.
    server = StandInServer(
        api_key=api_key,
        host=host,
        port=port,
        latency=latency,
        max_records=0,
        free=True,
        rate_limit=rate_limit,
        lockout=lockout,
    )
    try:
        server.start()
        if ready is not None:
            ready(server.url)
        while not server.wait_until_stopping(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return server
