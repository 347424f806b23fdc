"""Cancel of a hung request, on a direct connection and through a proxy (whose connections are tracked too).

The stand-in hangs the request; abort() must end the call within about a second, not at the read
timeout, on every platform (Windows wakes a read blocked in another thread only when the socket is
closed). A real forwarding proxy on 127.0.0.1 (tests/forward_proxy.py) stands between the client and
the stand-in for the proxy's case.
"""

from __future__ import annotations

import threading
import time

import pytest
from forward_proxy import ForwardProxy
from requests.adapters import HTTPAdapter

from structure_api import StructureClient, StructureRequest
from structure_api.errors import CancelledError
from structure_api.images import encode_upload
from structure_api.standin import Hang
from structure_api.transport import _TrackedConnection
from support import TEST_KEY, photo_like


def _hung_call(client: StructureClient) -> tuple[threading.Thread, list, list]:
    """Start a request the stand-in hangs; returns once its upload went out."""
    events: list = []
    outcome: list = []
    request = StructureRequest(image=encode_upload(photo_like(96, 64, 1)), prompt="a quay", seed=1)

    def run() -> None:
        try:
            client.generate(request, on_progress=events.append)
        except Exception as error:  # noqa: BLE001 - the test reads what it was
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while not any(event.stage == "waiting" for event in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the request is at the stand-in, waiting for an answer that never comes
    return worker, events, outcome


def test_abort_ends_a_hung_request_on_a_direct_connection_within_a_second(standin):
    standin.script(Hang())
    client = StructureClient(api_key=TEST_KEY, base_url=standin.url, read_timeout=8.0)
    worker, _, outcome = _hung_call(client)
    assert len(client.connections) == 1 and len(standin.requests) == 1  # it reached the stand-in
    started = time.monotonic()
    client.abort()
    worker.join(5)
    ended_after = time.monotonic() - started
    client.close()
    assert not worker.is_alive() and isinstance(outcome[0], CancelledError), outcome
    assert ended_after < 1.0, f"abort() took {ended_after:.2f} s"


def test_abort_ends_a_hung_request_through_a_proxy_within_a_second(standin, monkeypatch):
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        standin.script(Hang())
        client = StructureClient(api_key=TEST_KEY, base_url=standin.url, read_timeout=8.0)
        worker, _, outcome = _hung_call(client)
        assert len(client.connections) == 1  # the connection to the proxy is tracked
        started = time.monotonic()
        client.abort()
        worker.join(5)
        ended_after = time.monotonic() - started
        client.close()
        forwarded = proxy.requests
    assert not worker.is_alive() and isinstance(outcome[0], CancelledError), outcome
    assert ended_after < 1.0, f"abort() took {ended_after:.2f} s through the proxy"
    assert forwarded == [("POST", standin.endpoint)]  # it really went through the proxy


def test_without_tracked_connections_the_same_abort_waits_for_the_read_timeout(standin, monkeypatch):
    """The control: a plain adapter's proxy connections are out of abort()'s reach."""
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        standin.script(Hang())
        client = StructureClient(api_key=TEST_KEY, base_url=standin.url, read_timeout=3.0)
        client.session.mount("http://", HTTPAdapter(max_retries=0))
        worker, _, outcome = _hung_call(client)
        started = time.monotonic()
        client.abort()
        worker.join(10)
        ended_after = time.monotonic() - started
        client.close()
        forwarded = proxy.requests
    assert isinstance(outcome[0], CancelledError)
    assert ended_after > 2.0 and forwarded == [("POST", standin.endpoint)]


@pytest.mark.parametrize("proxy", ["http://127.0.0.1:3128", "https://127.0.0.1:3129"])
def test_every_pool_of_a_proxy_manager_makes_tracked_connections(proxy):
    with StructureClient(api_key=TEST_KEY, base_url="http://127.0.0.1:9") as client:
        adapter = client.session.get_adapter("https://example.com")
        manager = adapter.proxy_manager_for(proxy)
        assert set(manager.pool_classes_by_scheme) == {"http", "https"}
        for pool_cls in manager.pool_classes_by_scheme.values():
            assert issubclass(pool_cls.ConnectionCls, _TrackedConnection)
        assert adapter.proxy_manager_for(proxy) is manager  # made once per proxy
