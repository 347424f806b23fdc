"""The harness's own parts that need no server: the stand-ins, the archive download, the sweep's choice."""

from __future__ import annotations

import functools
import http.server
import io
import subprocess
import sys
import tarfile
import threading

import pytest

from tests.comfy import install, matrix
from tests.comfy.harness import TORCHVISION_STUB_DIR, ComfySetupError

# What ComfyUI 0.33.0 imports from them at start-up, and a use of each that must fail loudly.
_STUB_CHECK = """
import torchvision, torchaudio
from torchvision.ops import roi_align, deform_conv2d
import torchvision.transforms.functional as TVF
from torchvision.transforms.functional import InterpolationMode
from torchvision.transforms import ToPILImage, ToTensor
from torchvision.models.optical_flow import raft_large
import torchaudio.functional as AF
from torchaudio.transforms import MelScale
from _torch_family_stub import TorchFamilyUnavailable

class Subclass(MelScale):
    pass

failures = []
for use in (lambda: roi_align(1), lambda: TVF.resize(1, 2), lambda: Subclass(), lambda: torchaudio.load("x"),
            lambda: InterpolationMode.BICUBIC()):
    try:
        use()
        failures.append("no error")
    except TorchFamilyUnavailable as error:
        failures.append(str(error).split(" is not available")[0])
print(failures)
print(hasattr(torchvision, "__wrapped__"), torchvision.__version__, TVF.__name__)
try:
    import numpy.no_such_module
except ImportError:
    print("other packages unaffected")
"""


def test_stand_ins_import_every_submodule_and_raise_when_used():
    result = subprocess.run(
        [sys.executable, "-c", _STUB_CHECK],
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(TORCHVISION_STUB_DIR), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['torchvision.ops.roi_align', 'torchvision.transforms.functional.resize', "
        "'torchaudio.transforms.MelScale', 'torchaudio.load', "
        "'torchvision.transforms.functional.InterpolationMode.BICUBIC']",
        "False 0.0.0+harness.stub torchvision.transforms.functional",
        "other packages unaffected",
    ]


def test_sweep_takes_one_frontend_per_three_minors_and_each_pinned_one():
    available = [
        "1.58.1",
        "1.57.5",
        "1.55.18",
        "1.55.2",
        "1.52.7",
        "1.52.6",
        "1.49.7",
        "1.49.6",
        "1.46.15",
        "1.40.10",
        "1.40.0",
        "1.37.11",
        "1.34.9",
        "1.32.10",
        "1.32.9",
        "1.31.2",
        "1.28.9",
        "1.25.11",
        "1.25.10",
        "1.24.0.post1",
        "1.24.0",
    ]
    assert matrix.sweep_frontends(available, "1.58.1") == [
        "1.25.10",
        "1.28.9",
        "1.31.2",
        "1.32.9",
        "1.34.9",
        "1.37.11",
        "1.40.10",
        "1.46.15",
        "1.49.6",
        "1.52.7",
        "1.55.18",
        "1.58.1",
    ]  # no 1.43 release in this list: that step is left out, not guessed
    # The held-back newest ends the sweep.
    assert matrix.sweep_frontends(available, "1.55.2")[-2:] == ["1.52.7", "1.55.2"]


def test_sweep_serves_each_frontend_on_the_comfyui_of_its_time():
    frontends = ("1.25.10", "1.31.2", "1.32.9", "1.46.15", "1.49.6", "1.58.1")
    assert [matrix.sweep_server_for(v) for v in frontends] == [
        "0.3.52",
        "0.3.52",
        "0.3.75",
        "0.3.75",
        "0.33.0",
        "0.33.0",
    ]


def _archive_bytes(version: str) -> bytes:
    """A tar.gz laid out as GitHub's archive of a ComfyUI tag: one top folder, comfyui_version.py in it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in [
            (f"ComfyUI-{version}/comfyui_version.py", f'__version__ = "{version}"\n'),
            (f"ComfyUI-{version}/main.py", "print('main')\n"),
        ]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def archive_server(tmp_path):
    """A loopback HTTP server standing for GitHub: it serves tmp_path/served/ and counts the requests."""
    served = tmp_path / "served"
    served.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served, hits
    server.shutdown()
    server.server_close()


def test_source_archive_comes_from_the_folder_else_from_the_url_once(archive_server, tmp_path, monkeypatch):
    url, served, hits = archive_server
    (served / "v9.9.9.tar.gz").write_bytes(_archive_bytes("9.9.9"))
    monkeypatch.setitem(install.ARCHIVE_URL_FOR, "9.9.9", f"{url}/v9.9.9.tar.gz")
    log = tmp_path / "setup.log"

    # A folder named by the variable, holding the archive: used as it is, nothing downloaded.
    folder = tmp_path / "archives"
    folder.mkdir()
    (folder / "ComfyUI-9.9.9.tar.gz").write_bytes(_archive_bytes("9.9.9"))
    monkeypatch.setenv(install.ARCHIVE_DIR_ENV, str(folder))
    comfy_dir = install._fetch_comfyui(tmp_path / "from-folder", log, "9.9.9")
    assert (comfy_dir / "main.py").read_text() == "print('main')\n" and hits == []

    # No such folder: downloaded once, then reused.
    monkeypatch.delenv(install.ARCHIVE_DIR_ENV)
    for _ in range(2):
        comfy_dir = install._fetch_comfyui(tmp_path / "downloaded", log, "9.9.9")
        assert (comfy_dir / "comfyui_version.py").is_file()
    assert hits == ["/v9.9.9.tar.gz"]

    # An archive of another version is refused, naming both.
    (served / "v9.9.8.tar.gz").write_bytes(_archive_bytes("1.0.0"))
    monkeypatch.setitem(install.ARCHIVE_URL_FOR, "9.9.8", f"{url}/v9.9.8.tar.gz")
    with pytest.raises(ComfySetupError, match="does not hold ComfyUI 9.9.8"):
        install._fetch_comfyui(tmp_path / "wrong", log, "9.9.8")
    # Nothing at the URL: a clear error that says how to provide the archive instead.
    monkeypatch.setitem(install.ARCHIVE_URL_FOR, "9.9.7", f"{url}/missing.tar.gz")
    with pytest.raises(ComfySetupError, match="could not download ComfyUI 9.9.7 .*COMFY_HARNESS_ARCHIVE_DIR"):
        install._fetch_comfyui(tmp_path / "missing", log, "9.9.7")
