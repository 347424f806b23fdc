"""The stand-in, run in a process of its own so its CPU time and memory stay out of the measurements."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_READY = "listening on "


@dataclass(frozen=True)
class RunningServer:
    """A server process: where it listens, and how much CPU it has used."""

    url: str
    pid: int
    # What the process printed after it was told to stop (``serve`` sums up what it refused).
    final_output: list[str] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server_process(args: Sequence[str]) -> Iterator[RunningServer]:
    """Start ``python ARGS`` in the repository root; yield it once it prints its URL; stop it after."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AITHRIVING_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    url = None
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if _READY in line:
                url = line.split(_READY, 1)[1].strip()
                break
        if url is None:
            raise RuntimeError(f"the server {' '.join(args)} exited before it was listening")
        running = RunningServer(url=url, pid=process.pid)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # both servers stop cleanly on Ctrl-C
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            if url is not None and process.returncode is not None:
                running.final_output.extend(process.stdout.read().splitlines())
            process.stdout.close()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Debian's ``redis-server`` on a free loopback port, nothing saved; yields its redis:// URL."""
    import shutil
    import socket
    import tempfile
    import time

    import redis  # the pack's redis extra

    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                folder,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
            client.close()
            yield url
        finally:
            process.terminate()
            process.wait(10)


def standin(latency: float, *extra: str) -> contextlib.AbstractContextManager[RunningServer]:
    """The pack's own stand-in (``structure-api serve``): decodes each upload, renders, answers after
    ``latency``."""
    return server_process(["-m", "structure_api", "serve", "--port", "0", "--latency", repr(latency), *extra])


def photo_standin(side: int, answers: int, delay: float) -> contextlib.AbstractContextManager[RunningServer]:
    """The stand-in scripted to answer ``answers`` requests with a photo-like ``side`` x ``side`` PNG after
    ``delay``.

    The stand-in's own pictures are flat edge maps whose PNGs are a fraction of a real
    result's size; a memory measurement needs answers as large as the service's.
    """
    return server_process(
        ["-m", "benchmarks.servers", "--side", str(side), "--answers", str(answers), "--delay", repr(delay)]
    )


def _serve_photos(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=photo_standin.__doc__)
    parser.add_argument("--side", type=int, required=True)
    parser.add_argument("--answers", type=int, required=True)
    parser.add_argument("--delay", type=float, required=True)
    args = parser.parse_args(argv)

    from structure_api.standin import Respond, StandInServer

    from .content import response_json, service_png

    body = response_json(service_png(args.side, args.side, seed=4242))
    server = StandInServer(max_records=0)
    server.script(
        *(
            Respond(200, body=body, delay=args.delay, headers={"content-type": "application/json"})
            for _ in range(args.answers)
        )
    )
    try:
        server.start()
        print(f"photo stand-in {_READY}{server.url}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    _serve_photos(sys.argv[1:])
