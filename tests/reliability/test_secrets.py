"""Secrets: real flows with a recognisable key, then a search for it everywhere it must not be.

The key may appear in exactly one place: the ``authorization`` header of requests to the
configured service. It must not reach log records, exception text (message, repr, formatted
traceback), CLI output, written images, result store files, progress messages, any other recorded
request field, a host a redirect points to, or a plain-http connection to another machine.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from structure_api import StructureClient, StructureRequest
from structure_api.cli import main
from structure_api.config import APIKey
from structure_api.errors import BatchError, InsecureURLError, StructureError, UnexpectedRedirectError
from structure_api.pipeline import StructureParams, generate_images
from structure_api.standin import Drop, Hang, Passthrough, Respond, StandInServer
from structure_api.store import ResultStore

from .probes import CANARY_KEY, count_files, image_file_bytes, key_found_in, photo_like

REPO_ROOT = Path(__file__).resolve().parents[2]


class LeakSearch:
    """Looks for the key in each place it is given; remembers what was searched and what held it."""

    def __init__(self) -> None:
        self.places: list[str] = []
        self.leaks: list[str] = []

    def check(self, place: str, content) -> None:
        self.places.append(place)
        if key_found_in(content):
            self.leaks.append(place)

    def check_error(self, place: str, error: BaseException) -> None:
        self.check(f"{place}: str", str(error))
        self.check(f"{place}: repr", repr(error))
        self.check(f"{place}: formatted traceback", "".join(traceback.format_exception(error)))
        if isinstance(error, StructureError):
            self.check(f"{place}: reason", error.reason or "")
            if isinstance(error, BatchError):
                for index, inner in error.failures.items():
                    self.check_error(f"{place}: failure {index}", inner)

    def check_records(self, place: str, records) -> None:
        """The stand-in's records: the key only in the authorization header."""
        for number, record in enumerate(records):
            where = f"{place}: request {number}"
            other_headers = {name: value for name, value in record.headers.items() if name != "authorization"}
            self.check(f"{where} path", record.path)
            self.check(f"{where} other headers", repr(other_headers))
            self.check(f"{where} form fields", repr(record.fields))
            self.check(f"{where} image part", record.image_bytes or b"")
            self.check(f"{where} image filename/type", f"{record.image_filename} {record.image_content_type}")

    def check_logs(self, place: str, records) -> None:
        for record in records:
            text = record.getMessage()
            if record.exc_info:
                text += "".join(traceback.format_exception(*record.exc_info))
            self.check(f"{place}: log record {record.name}", text)
        self.places.append(f"{place}: log ({len(records)} records)")

    def book(self, ledger, flow: str, expected: str = "key only in the authorization header") -> None:
        ledger.count("key_places_checked", len(self.places))
        ledger.count("keys_leaked", len(self.leaks))
        ledger.row(
            "secrets",
            flow,
            expected,
            f"{len(self.places)} places searched, key found in {len(self.leaks)}"
            + (f": {self.leaks[:5]}" if self.leaks else ""),
        )


@pytest.fixture
def search() -> LeakSearch:
    return LeakSearch()


# --- client -------------------------------------------------------------------------------------

CLIENT_FAULTS = [
    None,  # success
    Respond(401, body={"code": -1, "message": f"Invalid API key {CANARY_KEY}"}),  # the server echoes it
    Respond(403, body={"id": "x", "name": "forbidden", "errors": [f"key {CANARY_KEY} revoked"]}),
    Respond(
        400,
        body=f"<html><body>bad request for key={CANARY_KEY}</body></html>",
        headers={"Content-Type": "text/html"},
    ),
    Respond(200, body={"code": -1, "message": f"failed for authorization: {CANARY_KEY}"}),
    Respond(429, headers={"Retry-After": "1"}),
    Respond(503),
    Respond(200, body=b'{"code": 0, "data": {"ima'),
    Drop(),
    Hang(),
    Respond(302, headers={"Location": "http://127.0.0.2:9/steal"}, body=b""),
]


def test_client_flows_never_show_the_key(service, new_client, small_upload, search, ledger, caplog):
    caplog.set_level(logging.DEBUG)
    client = new_client(read_timeout=0.3)
    search.check("client repr", repr(client))
    search.check("client attributes", repr(vars(client)))
    search.check("session attributes", repr(vars(client.session)))
    search.check("APIKey str and repr", f"{APIKey(CANARY_KEY)} {APIKey(CANARY_KEY)!r}")
    for number, fault in enumerate(CLIENT_FAULTS):
        if fault is not None:
            service.script(fault)
        events = []
        try:
            result = client.generate(
                StructureRequest(image=small_upload, prompt="a red kite", seed=3), on_progress=events.append
            )
            search.check(f"flow {number}: result repr", repr(result))
            search.check(f"flow {number}: result image bytes", result.data)
        except StructureError as error:
            search.check_error(f"flow {number} ({type(error).__name__})", error)
        search.check(f"flow {number}: progress messages", " ".join(event.message for event in events))
    search.check_logs("client", caplog.records)
    search.check_records("client", service.requests)
    assert all(r.headers.get("authorization") == CANARY_KEY for r in service.requests)
    search.book(
        ledger, f"client: success and {len(CLIENT_FAULTS) - 1} failures, 3 of them echoing the key back"
    )
    assert search.leaks == []


def test_node_logic_batch_with_result_store_and_failures(
    service, new_client, tmp_path, search, ledger, caplog
):
    caplog.set_level(logging.DEBUG)
    service.script(Respond(200, body={"code": -1, "message": f"nope {CANARY_KEY}"}))
    store = ResultStore(tmp_path / "cache")
    images = np.stack([photo_like(80, 64, seed=i) for i in range(4)]).astype(np.float32) / 255
    progress = []
    params = StructureParams(prompt="a tiled roof", seed=77)
    with pytest.raises(BatchError) as caught:
        generate_images(
            images, params, client=new_client(), store=store, max_concurrency=2, on_progress=progress.append
        )
    search.check_error("node batch error", caught.value)
    result = generate_images(images, params, client=new_client(), store=store, on_progress=progress.append)
    search.check("node result seeds", repr(result.seeds))
    search.check("node output pixels", np.asarray(result.images).tobytes())
    search.check("node progress messages", " ".join(p.message for p in progress))
    for path in sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file()):
        search.check(f"store file {path.suffix}", path.read_bytes())
    search.check_logs("node", caplog.records)
    search.check_records("node", service.requests)
    search.book(
        ledger, "node logic: batch of 4 with a failure echoing the key, result store written and read"
    )
    assert count_files(tmp_path / "cache") >= 6 and search.leaks == []


# --- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch, service, tmp_path):
    monkeypatch.setenv("AITHRIVING_BASE_URL", service.url)
    monkeypatch.setenv("AITHRIVING_API_KEY", CANARY_KEY)
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", str(tmp_path / "cache"))


def test_cli_in_process_generate_and_batch(tmp_path, cli_env, service, capsys, search, ledger, caplog):
    caplog.set_level(logging.DEBUG)
    source = tmp_path / "in.png"
    source.write_bytes(image_file_bytes(photo_like(96, 80)))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(image_file_bytes(photo_like(96, 80, seed=i)))
    runs = [
        ["generate", source, "--prompt", "ink", "--seed", "4", "-o", tmp_path / "out" / "a.png"],
        [
            "generate",
            source,
            "--prompt",
            "ink",
            "--seed",
            "4",
            "-o",
            tmp_path / "out" / "b.png",
        ],  # from the result store
        ["batch", folder, "--prompt", "ink", "--seed", "9", "-o", tmp_path / "out" / "batch"],
    ]
    service.script(Passthrough(), Respond(200, body={"code": -1, "message": f"bad {CANARY_KEY}"}))
    for number, argv in enumerate(runs):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        search.check(f"run {number}: stdout", out)
        search.check(f"run {number}: stderr", err)
        assert code in (0, 1)
    for path in sorted((tmp_path / "out").rglob("*")) + sorted((tmp_path / "cache").rglob("*")):
        if path.is_file():
            search.check(f"file {path.relative_to(tmp_path)}", path.read_bytes())
    search.check_logs("cli", caplog.records)
    search.check_records("cli", service.requests)
    search.book(
        ledger,
        "CLI in process: generate, generate from the result store, batch with a failure echoing the key",
    )
    assert search.leaks == []


def _subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITHRIVING_")}
    env.update({"PYTHONPATH": str(REPO_ROOT)}, **extra)
    return env


def test_cli_subprocess_verbose_and_serve(tmp_path, service, search, ledger):
    source = tmp_path / "in.png"
    source.write_bytes(image_file_bytes(photo_like(96, 80)))
    env = _subprocess_env(
        AITHRIVING_API_KEY=CANARY_KEY,
        AITHRIVING_BASE_URL=service.url,
        AITHRIVING_CACHE_DIR=str(tmp_path / "cache"),
    )
    service.script(Respond(503), Passthrough())
    verbose = subprocess.run(
        [
            sys.executable,
            "-m",
            "structure_api",
            "-v",
            "generate",
            str(source),
            "--prompt",
            "ink",
            "--seed",
            "8",
            "-o",
            str(tmp_path / "out.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert verbose.returncode == 0, verbose.stderr
    assert "INFO" in verbose.stderr  # -v really logged (requests, the retry)
    search.check("generate -v: stdout", verbose.stdout)
    search.check("generate -v: stderr (INFO log)", verbose.stderr)
    search.check("generate -v: output file", (tmp_path / "out.png").read_bytes())
    for path in sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file()):
        search.check(f"generate -v: store file {path.suffix}", path.read_bytes())

    key_file = tmp_path / "key"
    key_file.write_text(CANARY_KEY + "\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "structure_api", "serve", "--require-key"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(AITHRIVING_API_KEY_FILE=str(key_file)),
        cwd=tmp_path,
    )
    try:
        first_lines = "".join(server.stdout.readline() for _ in range(3))
        url = first_lines.split("listening on ", 1)[1].split()[0]
        with StructureClient(api_key=CANARY_KEY, base_url=url) as client:
            client.generate(StructureRequest(image=_upload(), prompt="ink", seed=1))
        with (
            StructureClient(api_key="sk-wrong", base_url=url) as client,
            pytest.raises(StructureError) as caught,
        ):
            client.generate(StructureRequest(image=_upload(), prompt="ink", seed=1))
        search.check_error("serve --require-key: wrong key error", caught.value)
    finally:
        server.terminate()
        out, err = server.communicate(timeout=10)
    search.check("serve --require-key: stdout", first_lines + out)
    search.check("serve --require-key: stderr", err)
    search.check_records("generate -v", service.requests)
    search.book(
        ledger, "CLI as a subprocess: generate -v (INFO log on stderr) with a retry; serve --require-key"
    )
    assert search.leaks == []


def _upload():
    from structure_api.images import encode_upload

    return encode_upload(photo_like(96, 64))


# --- where the key must never travel ---------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_never_takes_the_key_to_the_other_host(status, service, new_client, small_upload, ledger):
    with StandInServer(host="127.0.0.2") as other:
        service.script(Respond(status, headers={"Location": other.endpoint}, body=b""))
        with pytest.raises(UnexpectedRedirectError):
            new_client().generate(StructureRequest(image=small_upload, prompt="a red kite", seed=3))
        time.sleep(0.05)  # real time on purpose: a followed redirect would have arrived by now
        reached = other.requests
    ledger.count("key_places_checked")
    ledger.count("keys_leaked", len(reached))
    ledger.row(
        "secrets",
        f"redirect {status} to another host (127.0.0.2)",
        "not followed; other host sees nothing",
        f"other host saw {len(reached)} requests",
        requests=len(service.requests),
    )
    assert reached == []


class SocketAudit:
    """Records the network calls (connect, name lookups) this process makes while active."""

    _installed: SocketAudit | None = None

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.active = False

    @classmethod
    def instance(cls) -> SocketAudit:
        # An audit hook cannot be removed, so one is installed per process and switched on and off.
        if cls._installed is None:
            cls._installed = cls()
            sys.addaudithook(cls._installed._hook)
        return cls._installed

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event in (
            "socket.connect",
            "socket.getaddrinfo",
            "socket.gethostbyname",
            "socket.sendto",
            "socket.sendmsg",
        ):
            self.events.append((event, args[1:] if event == "socket.connect" else args))

    def __enter__(self) -> SocketAudit:
        self.events.clear()
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False


def _machine_address() -> str | None:
    """This machine's own non-loopback IPv4 address, if it has one (UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


PLAIN_HTTP_ELSEWHERE = [
    "http://10.255.255.1",
    "http://example.com",
    "HTTP://EXAMPLE.COM:80",
    "http://127.0.0.1.nip.io",
    "http://[::ffff:7f00:1]",
    "http://0.0.0.0:8188",
]


@pytest.mark.parametrize("url", PLAIN_HTTP_ELSEWHERE)
def test_plain_http_to_another_host_is_refused_before_any_network_call(url, ledger):
    audit = SocketAudit.instance()
    with audit, pytest.raises(InsecureURLError) as caught:
        StructureClient(api_key=CANARY_KEY, base_url=url)
    ledger.count("key_places_checked")
    ledger.count("keys_leaked", len(audit.events))
    ledger.row(
        "secrets",
        f"plain http to {url}",
        "InsecureURLError at construction; no connect, no DNS lookup",
        f"{type(caught.value).__name__}; network calls: {len(audit.events)}",
    )
    assert audit.events == [] and not key_found_in(str(caught.value))
    assert "plain http" in str(caught.value)


def test_plain_http_to_this_machines_own_address_reaches_nothing(ledger, capsys, monkeypatch, tmp_path):
    """A real listener on the machine's non-loopback address: neither the client nor the CLI ever talks to
    it."""
    address = _machine_address()
    if address is None:  # the audit test above still covers the rule
        pytest.skip("this machine has no non-loopback IPv4 address to listen on")
    with StandInServer(host=address) as listener:
        audit = SocketAudit.instance()
        with audit, pytest.raises(InsecureURLError):
            StructureClient(api_key=CANARY_KEY, base_url=listener.url)
        client_events = list(audit.events)
        source = tmp_path / "in.png"
        source.write_bytes(image_file_bytes(photo_like(96, 80)))
        monkeypatch.setenv("AITHRIVING_BASE_URL", listener.url)
        monkeypatch.setenv("AITHRIVING_API_KEY", CANARY_KEY)
        with audit:
            code = main(["generate", str(source), "--prompt", "ink", "-o", str(tmp_path / "out.png")])
        out, err = capsys.readouterr()
        time.sleep(0.05)
        reached = listener.requests
    ledger.count("key_places_checked", 3)
    ledger.count("keys_leaked", len(reached) + len(client_events) + len(audit.events))
    ledger.row(
        "secrets",
        f"plain http to this machine's own address ({address}), a listener there",
        "client and CLI refuse (exit 1, one line); the listener sees nothing",
        f"CLI exit {code}: {err.strip()}; listener saw {len(reached)} requests; network calls "
        f"{len(client_events) + len(audit.events)}",
    )
    assert reached == [] and client_events == [] and audit.events == []
    assert code == 1 and err.count("\n") == 1 and "plain http" in err and not key_found_in(out + err)


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}", "http://localhost:{port}"])
def test_plain_http_to_loopback_is_allowed(url, service, ledger, small_upload):
    base = url.format(port=service.port)
    with StructureClient(api_key=CANARY_KEY, base_url=base, sleep=lambda s: None) as client:
        result = client.generate(StructureRequest(image=small_upload, prompt="a red kite", seed=3))
    ledger.row(
        "secrets",
        f"plain http to loopback ({base.split(':')[1].strip('/')})",
        "allowed (stays on this machine)",
        f"result seed {result.seed}",
        requests=len(service.requests),
    )
    assert result.seed == 3 and service.requests[0].headers["authorization"] == CANARY_KEY


def test_a_key_pasted_into_the_base_url_variable_is_not_echoed(monkeypatch, tmp_path, capsys, ledger):
    """A plausible slip: the key pasted into AITHRIVING_BASE_URL. The error must not print it back."""
    source = tmp_path / "in.png"
    source.write_bytes(image_file_bytes(photo_like(96, 80)))
    monkeypatch.setenv("AITHRIVING_BASE_URL", CANARY_KEY)
    monkeypatch.setenv("AITHRIVING_API_KEY", CANARY_KEY)
    code = main(["generate", str(source), "--prompt", "ink", "-o", str(tmp_path / "out.png")])
    out, err = capsys.readouterr()
    leaked = key_found_in(out + err)
    ledger.count("known_leaks_outside_scope", int(leaked))
    ledger.row(
        "secrets",
        "the key pasted into AITHRIVING_BASE_URL by mistake (config.py)",
        "a one-line error that does not print the value back",
        f"exit {code}: {err.strip()[:90]}…" if leaked else f"exit {code}: {err.strip()}",
    )
    assert code == 1 and not leaked


def test_the_search_itself_finds_the_key_where_it_could_hide():
    """The leak search is only worth its zero if it finds the key when it is there."""
    import base64
    import io
    import zlib

    from PIL import Image, PngImagePlugin

    assert key_found_in(f"x{CANARY_KEY}y") and key_found_in(CANARY_KEY.encode("utf-8"))
    for shift in range(3):
        assert key_found_in(base64.b64encode(b"#" * shift + CANARY_KEY.encode() + b"tail"))
    text = f'{{"key": "{CANARY_KEY}"}}' + " padding" * 40
    for kind, compressed in (("tEXt", False), ("zTXt", True), ("iTXt", True)):
        info = PngImagePlugin.PngInfo()
        if kind == "iTXt":
            info.add_itxt("prompt", text, zip=True)
        else:
            info.add_text("prompt", text, zip=compressed)
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
        data = buffer.getvalue()
        assert kind.encode() in data and key_found_in(data), kind
        if compressed:
            assert CANARY_KEY.encode() not in data  # only decoding the chunk finds it
    assert not key_found_in(zlib.compress(b"nothing to see"))
    with SocketAudit.instance() as audit, socket.create_connection(("127.0.0.1", _listening_port())):
        pass
    assert any(event == "socket.connect" for event, _ in audit.events)


def _listening_port() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    threading.Thread(target=lambda: (listener.accept()[0].close(), listener.close()), daemon=True).start()
    return listener.getsockname()[1]
