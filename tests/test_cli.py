"""The structure-api command, in-process and as a real subprocess, against the stand-in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from structure_api import StructureClient, StructureRequest
from structure_api.cli import main
from structure_api.images import EncodedImage, ImageSize
from structure_api.standin import Fault

from support import TEST_KEY, photo_like, write_png


@pytest.fixture
def env_for(monkeypatch):
    def setup(server):
        monkeypatch.setenv("AITHRIVING_BASE_URL", server.url)
        monkeypatch.setenv("AITHRIVING_API_KEY", TEST_KEY)
    return setup


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert TEST_KEY not in out and TEST_KEY not in err
    assert "Traceback" not in err
    return code, out, err


def test_generate_writes_the_servers_image_and_prints_the_seed(tmp_path, standin, env_for, capsys):
    env_for(standin)
    source = write_png(tmp_path / "in.png", photo_like(200, 150))
    code, out, err = run(capsys, "generate", source, "--prompt", "a red barn", "--seed", "321",
                         "-o", tmp_path / "out.png")
    assert code == 0, err
    assert re.match(r"seed 321 · 6 credits · wrote .*out\.png \(200x150 png\)", out)
    # The file is byte for byte what the service returned for this request.
    upload = EncodedImage(data=source.read_bytes(), format="png", mime_type="image/png",
                          size=ImageSize(width=200, height=150))
    with StructureClient(api_key=TEST_KEY, base_url=standin.url) as client:
        expected = client.generate(StructureRequest(image=upload, prompt="a red barn", seed=321))
    assert (tmp_path / "out.png").read_bytes() == expected.data
    assert standin.requests[0].image_bytes == source.read_bytes()  # a valid file is sent as it is


def test_generate_format_from_extension_and_fitting(tmp_path, standin, env_for, capsys):
    env_for(standin)
    source = write_png(tmp_path / "wide.png", photo_like(500, 40))  # 12.5:1 and under 64 px high
    code, out, err = run(capsys, "generate", source, "--prompt", "a pier", "-o", tmp_path / "out.webp")
    assert code == 0, err
    with Image.open(tmp_path / "out.webp") as image:
        assert image.format == "WEBP" and image.size == (500, 40)
    assert standin.requests[0].fields["output_format"] == "webp"


def test_local_needs_no_key_and_no_network(tmp_path, capsys):
    source = write_png(tmp_path / "in.png", photo_like(128, 128))
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.png", "--local")
    assert code == 0, err
    assert "local stand-in" in err and "· 0 credits (local stand-in) ·" in out
    assert Image.open(tmp_path / "out.png").size == (128, 128)


def test_no_key_means_nothing_is_sent(tmp_path, standin, monkeypatch, capsys):
    monkeypatch.setenv("AITHRIVING_BASE_URL", standin.url)
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.png")
    assert code == 1
    assert err.count("\n") == 1 and "AITHRIVING_API_KEY" in err
    assert standin.requests == []
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("fault, words", [
    (Fault(status=401), "rejected the API key"),
    (Fault(status=402), "out of credits"),
    (Fault(status=400, body={"code": -1, "message": "prompt: too odd"}), "prompt: too odd"),
    (Fault(status=413), "10 MiB"),
    (Fault(status=200, body={"code": -1, "message": "upstream failed"}), "upstream failed"),
    (Fault(status=200, body=b"<html>oops</html>"), "not JSON"),
    (Fault(action="hang"), "may have"),
])
def test_each_error_is_one_line_and_non_zero(tmp_path, standin, env_for, capsys, fault, words):
    env_for(standin)
    standin.script(fault)
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.png",
                         "--timeout", "0.5")
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err
    assert out == ""


def test_bad_input_file_and_bad_arguments(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    code, out, err = run(capsys, "generate", tmp_path / "notes.png", "--prompt", "x", "-o", tmp_path / "o.png",
                         "--local")
    assert code == 1 and "not an image" in err
    code, out, err = run(capsys, "generate", tmp_path / "missing.png", "--prompt", "x", "-o", tmp_path / "o.png",
                         "--local")
    assert code == 1 and "Cannot read" in err
    code, out, err = run(capsys, "generate", tmp_path / "notes.png", "--prompt", "  ", "-o", tmp_path / "o.png",
                         "--local")
    assert code == 1 and "prompt is empty" in err
    with pytest.raises(SystemExit) as info:
        main(["generate", "x.png", "--prompt", "p", "-o", "o.png", "--control-strength", "3"])
    assert info.value.code == 2


def test_batch_resumes_and_summarises(tmp_path, standin, env_for, capsys):
    env_for(standin)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        write_png(inputs / f"img{i}.png", photo_like(96 + i * 8, 80, seed=i))
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    outputs = tmp_path / "out"
    code, out, err = run(capsys, "batch", inputs, "--prompt", "ink drawing", "--seed", "10", "-o", outputs,
                         "--concurrency", "3")
    assert code == 1  # the broken file failed
    assert out.strip() == "done 5, failed 1, skipped 0, credits 30"
    assert "failed: broken.jpg:" in err
    assert sorted(p.name for p in outputs.iterdir()) == [f"img{i}.png" for i in range(5)]
    for i in range(5):
        assert Image.open(outputs / f"img{i}.png").size == (96 + i * 8, 80)
    # Seeds follow the sorted file order: broken.jpg is first, so img0..img4 get 11..15.
    assert sorted(int(r.fields["seed"]) for r in standin.requests) == [11, 12, 13, 14, 15]
    (inputs / "broken.jpg").unlink()
    code, out, err = run(capsys, "batch", inputs, "--prompt", "ink drawing", "-o", outputs)
    assert code == 0 and out.strip() == "done 0, failed 0, skipped 5, credits 0"
    assert len(standin.requests) == 5


def test_batch_of_an_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "batch", tmp_path / "empty", "--prompt", "x", "-o", tmp_path / "out", "--local")
    assert code == 1 and "no .png" in err


def _subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITHRIVING_")}
    env.update(extra)
    return env


def test_python_dash_m_entry_point_runs_local(tmp_path):
    source = write_png(tmp_path / "in.png", photo_like(120, 90))
    proc = subprocess.run(
        [sys.executable, "-m", "structure_api", "generate", str(source), "--prompt", "a lighthouse",
         "-o", str(tmp_path / "out.png"), "--local", "--seed", "5"],
        capture_output=True, text=True, timeout=60, env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("seed 5 ")


def test_serve_answers_like_the_service(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "structure_api", "serve"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_subprocess_env())
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        with open(write_png(tmp_path / "in.png", photo_like(64, 64)), "rb") as handle:
            answer = requests.post(url + "/api/control/structure", files={"image": handle},
                                   data={"prompt": "p"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["code"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
