"""The structure-api command, in-process and as a real subprocess, against the stand-in."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps

from structure_api import StructureClient, StructureRequest
from structure_api.cli import main
from structure_api.images import EncodedImage, ImageSize
from structure_api.standin import Hang, Respond
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
    code, out, err = run(
        capsys, "generate", source, "--prompt", "a red barn", "--seed", "321", "-o", tmp_path / "out.png"
    )
    assert code == 0, err
    assert re.match(r"seed 321 · 6 credits · wrote .*out\.png \(200x150 png\)", out)
    # The file is byte for byte what the service returned for this request.
    upload = EncodedImage(
        data=source.read_bytes(), format="png", mime_type="image/png", size=ImageSize(width=200, height=150)
    )
    with StructureClient(api_key=TEST_KEY, base_url=standin.url) as client:
        expected = client.generate(StructureRequest(image=upload, prompt="a red barn", seed=321))
    assert (tmp_path / "out.png").read_bytes() == expected.data
    # The pixels are sent, re-encoded (never the file, which may carry metadata), losslessly.
    sent = np.asarray(Image.open(io.BytesIO(standin.requests[0].image_bytes)).convert("RGB"))
    assert np.array_equal(sent, np.asarray(Image.open(source).convert("RGB")))


def test_generate_format_from_extension_and_fitting(tmp_path, standin, env_for, capsys):
    env_for(standin)
    source = write_png(tmp_path / "wide.png", photo_like(500, 40))  # 12.5:1 and under 64 px high
    code, out, err = run(capsys, "generate", source, "--prompt", "a pier", "-o", tmp_path / "out.webp")
    assert code == 0, err
    with Image.open(tmp_path / "out.webp") as image:
        assert image.format == "WEBP" and image.size == (500, 40)
    assert standin.requests[0].fields["output_format"] == "webp"


def test_offline_needs_no_key_and_no_network(tmp_path, capsys):
    source = write_png(tmp_path / "in.png", photo_like(128, 128))
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.png", "--offline")
    assert code == 0, err
    assert "stand-in" in err and "· 0 credits (free stand-in) ·" in out
    assert Image.open(tmp_path / "out.png").size == (128, 128)


def test_no_key_means_nothing_is_sent(tmp_path, standin, monkeypatch, capsys):
    monkeypatch.setenv("AITHRIVING_BASE_URL", standin.url)
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.png")
    assert code == 1
    assert err.count("\n") == 1 and "AITHRIVING_API_KEY" in err
    assert standin.requests == []
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    "fault, words",
    [
        (Respond(401), "rejected the API key"),
        (Respond(402), "out of credits"),
        (Respond(400, body={"code": -1, "message": "prompt: too odd"}), "prompt: too odd"),
        (Respond(413), "10 MiB"),
        (Respond(200, body={"code": -1, "message": "upstream failed"}), "upstream failed"),
        (Respond(200, body=b"<html>oops</html>"), "not JSON"),
        (Hang(), "may have"),
    ],
)
def test_each_error_is_one_line_and_non_zero(tmp_path, standin, env_for, capsys, fault, words):
    env_for(standin)
    standin.script(fault)
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    code, out, err = run(
        capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.png", "--timeout", "0.5"
    )
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err
    assert out == ""


def test_an_answer_whose_seed_cannot_be_read_still_delivers_the_image(tmp_path, standin, env_for, capsys):
    """A 5000-digit seed (int() refuses it) once ended the run with a traceback; the seed is cosmetic."""
    env_for(standin)
    image = io.BytesIO()
    Image.fromarray(photo_like(100, 100)).save(image, format="PNG")
    data = {"image": base64.b64encode(image.getvalue()).decode(), "seed": "9" * 5000}
    standin.script(Respond(200, body={"code": 0, "message": "success", "data": data}))
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.png")
    assert code == 0, err
    assert out.startswith("seed unknown · 6 credits · wrote ") and (tmp_path / "out.png").exists()


def test_bad_input_file_and_bad_arguments(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    code, out, err = run(
        capsys, "generate", tmp_path / "notes.png", "--prompt", "x", "-o", tmp_path / "o.png", "--offline"
    )
    assert code == 1 and "not an image" in err
    code, out, err = run(
        capsys, "generate", tmp_path / "missing.png", "--prompt", "x", "-o", tmp_path / "o.png", "--offline"
    )
    assert code == 1 and "Cannot read" in err
    code, out, err = run(
        capsys, "generate", tmp_path / "notes.png", "--prompt", "  ", "-o", tmp_path / "o.png", "--offline"
    )
    assert code == 2 and "prompt is empty" in err
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
    code, out, err = run(
        capsys,
        "batch",
        inputs,
        "--prompt",
        "ink drawing",
        "--seed",
        "10",
        "-o",
        outputs,
        "--concurrency",
        "3",
    )
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
    code, out, err = run(
        capsys, "batch", tmp_path / "empty", "--prompt", "x", "-o", tmp_path / "out", "--offline"
    )
    assert code == 1 and "no .png" in err


def _subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITHRIVING_")}
    env.update(extra)
    return env


def test_python_dash_m_entry_point_runs_offline(tmp_path):
    source = write_png(tmp_path / "in.png", photo_like(120, 90))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "structure_api",
            "generate",
            str(source),
            "--prompt",
            "a lighthouse",
            "-o",
            str(tmp_path / "out.png"),
            "--offline",
            "--seed",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("seed 5 ")


def test_serve_answers_like_the_service(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "structure_api", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        with open(write_png(tmp_path / "in.png", photo_like(64, 64)), "rb") as handle:
            answer = requests.post(
                url + "/api/control/structure", files={"image": handle}, data={"prompt": "p"}, timeout=30
            )
        assert answer.status_code == 200 and answer.json()["code"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- checked before paying ------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, words",
    [
        ("a_folder", "is a folder"),
        ("a_file/out.png", "is a file, not a folder"),
        ("out.gif", "needs the extension"),
        ("out", "needs the extension"),
        ("out.png --format jpeg", "has the extension .png but --format is jpeg"),
    ],
)
def test_generate_refuses_an_unusable_output_before_sending(
    tmp_path, standin, env_for, capsys, output, words
):
    env_for(standin)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("a file, not a folder")
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    name, *extra = output.split()
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / name, *extra)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert standin.requests == [] and standin.credits_spent == 0


@pytest.mark.posix_only(
    "permission bits (chmod 0500) are POSIX; on Windows a folder's read-only "
    "attribute does not stop files being made in it"
)
def test_generate_output_in_a_folder_it_cannot_write(tmp_path, standin, env_for, capsys):
    env_for(standin)
    locked = tmp_path / "locked"
    locked.mkdir()
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    # A read-only bind mount would need privileges; a file where the folder must go is the same refusal
    # for mkdir, and the write probe covers the rest (root ignores permission bits, so they prove nothing).
    locked.chmod(0o500)
    try:
        code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", locked / "sub" / "out.png")
    finally:
        locked.chmod(0o700)
    if os.geteuid() == 0:
        assert code == 0  # root may write anywhere: the probe found the folder writable, and it was
    else:
        assert code == 1 and "Cannot create the folder" in err and standin.requests == []


def test_batch_refuses_two_inputs_with_one_output(tmp_path, standin, env_for, capsys):
    env_for(standin)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "photo.png", photo_like(96, 80))
    Image.fromarray(photo_like(96, 80, seed=1)).save(inputs / "photo.jpg")
    write_png(inputs / "other.png", photo_like(96, 80, seed=2))
    code, out, err = run(capsys, "batch", inputs, "--prompt", "x", "-o", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1
    assert "photo.jpg and photo.png would both be written to" in err and "nothing was sent" in err
    assert standin.requests == [] and standin.credits_spent == 0
    code, out, err = run(capsys, "batch", inputs, "--prompt", "x", "-o", inputs)
    assert code == 1 and "is the input folder" in err and standin.requests == []


def test_batch_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    from structure_api.files import FolderLock

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "a.png", photo_like(96, 80))
    outputs = tmp_path / "out"
    outputs.mkdir()
    # The lock another process holds: flock locks conflict between open files even in one process.
    with FolderLock(outputs):
        code, out, err = run(capsys, "batch", inputs, "--prompt", "x", "-o", outputs, "--offline")
        assert code == 1 and err.count("\n") == 1 and "in use by another structure-api batch run" in err
        assert f"process {os.getpid()}" in err
        assert not (outputs / "a.png").exists()
    code, out, err = run(capsys, "batch", inputs, "--prompt", "x", "-o", outputs, "--offline")
    assert code == 0 and sorted(p.name for p in outputs.iterdir()) == ["a.png"]  # the lock file is gone


@pytest.mark.posix_only(
    "the umask and file modes do not exist on Windows (files there follow the folder's ACL)"
)
def test_outputs_follow_the_umask(tmp_path, capsys):
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    for mask, mode in ((0o022, 0o644), (0o002, 0o664)):
        previous = os.umask(mask)
        try:
            code, out, err = run(
                capsys, "generate", source, "--prompt", "x", "-o", tmp_path / f"{mask:o}.png", "--offline"
            )
        finally:
            os.umask(previous)
        assert code == 0, err
        assert (tmp_path / f"{mask:o}.png").stat().st_mode & 0o777 == mode


def _camera_jpeg(path: Path, width: int, height: int, orientation: int) -> Path:
    """A JPEG as a phone writes it: EXIF with orientation, camera and GPS position, and a comment."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0131] = "SecretCam 1.0"  # Software
    gps = {1: "N", 2: (51.0, 30.0, 12.5), 3: "W", 4: (0.0, 7.0, 39.9)}
    exif[0x8825] = gps
    Image.fromarray(photo_like(width, height)).save(
        path, "JPEG", quality=95, exif=exif, comment=b"home address, 12 Secret Lane"
    )
    return path


def test_input_orientation_applied_and_metadata_never_sent(tmp_path, standin, env_for, capsys):
    env_for(standin)
    # Stored 160x96 landscape, orientation 6: the photo stands upright as 96x160 portrait.
    source = _camera_jpeg(tmp_path / "phone.jpg", 160, 96, orientation=6)
    assert b"SecretCam" in source.read_bytes() and b"12 Secret Lane" in source.read_bytes()
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.png")
    assert code == 0, err
    upload = standin.requests[0].image_bytes
    for secret in (b"SecretCam", b"PhoneMaker", b"Secret Lane", b"Exif", b"GPS"):
        assert secret not in upload
    with Image.open(io.BytesIO(upload)) as sent:
        assert sent.size == (96, 160)  # upright, as ComfyUI's LoadImage shows it
        assert not sent.getexif() and "comment" not in sent.info and "exif" not in sent.info
    with Image.open(tmp_path / "out.png") as written:
        assert written.size == (96, 160)
    with Image.open(source) as original:
        expected = np.asarray(ImageOps.exif_transpose(original).convert("RGB"))
    sent_pixels = np.asarray(Image.open(io.BytesIO(upload)).convert("RGB"))
    assert np.array_equal(sent_pixels, expected)


# --- rough edges ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3", "33", "100", "four"])
def test_concurrency_outside_1_to_32_is_one_line_exit_2(tmp_path, capsys, value):
    code, out, err = run_any(
        capsys,
        "batch",
        tmp_path,
        "--prompt",
        "x",
        "-o",
        tmp_path / "out",
        "--offline",
        "--concurrency",
        value,
    )
    assert code == 2 and err.count("\n") == 1 and "argument --concurrency: must be" in err, err
    assert "from 1 to 32" in err, err


def test_concurrency_default_is_the_batch_default(capsys):
    from structure_api.batch import DEFAULT_MAX_CONCURRENCY
    from structure_api.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["batch", "--help"])
    assert f"AITHRIVING_MAX_CONCURRENCY or {DEFAULT_MAX_CONCURRENCY})" in " ".join(
        capsys.readouterr().out.split()
    )


def run_any(capsys, *argv):
    """Like run(), but an argparse refusal (SystemExit) counts as its exit status."""
    try:
        return run(capsys, *argv)
    except SystemExit as exit_:
        out, err = capsys.readouterr()
        return exit_.code, out, err


def test_out_of_range_values_one_style_whichever_check_catches_them(tmp_path, capsys):
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    base = ["generate", source, "-o", tmp_path / "o.png", "--offline"]
    outcomes = [
        run_any(capsys, *base, "--prompt", "x", "--control-strength", "3"),  # argparse
        run_any(capsys, *base, "--prompt", "x", "--seed", "-5"),  # argparse
        run_any(capsys, *base, "--prompt", "x" * 10001),  # our validation
        run_any(capsys, *base, "--prompt", "  "),
    ]  # our validation
    for code, out, err in outcomes:
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and out == "", err


def test_serve_on_a_busy_or_impossible_port_is_one_line(capsys):
    from structure_api.standin import StandInServer

    with StandInServer() as busy:
        code, out, err = run(capsys, "serve", "--port", busy.port)
    assert (
        code == 1
        and err
        == f"error: Port {busy.port} is already in use; choose another with --port, "
        "or leave --port out to take a free one.\n"
    )
    code, out, err = run_any(capsys, "serve", "--port", "70000")
    assert code == 2 and err.count("\n") == 1 and "argument --port: must be from 0 to 65535" in err


def test_serve_banner_names_both_variables():
    proc = subprocess.Popen(
        [sys.executable, "-m", "structure_api", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
    )
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    url = lines[0].split("listening on ", 1)[1].strip()  # as benchmarks/servers.py reads it
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    assert (
        f"  export AITHRIVING_BASE_URL={url}\n" in lines and "  export AITHRIVING_API_KEY=stand-in\n" in lines
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999",
        "http://127.0.0.1:port",
        "http://[::1",
        "http://[::zz]:80",
        "http://127.0.0.1:0",
    ],
)
def test_base_url_with_a_bad_port_or_ipv6_literal_is_a_configuration_error(
    tmp_path, monkeypatch, capsys, url
):
    monkeypatch.setenv("AITHRIVING_BASE_URL", url)
    monkeypatch.setenv("AITHRIVING_API_KEY", TEST_KEY)
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    code, out, err = run(capsys, "-v", "generate", source, "--prompt", "x", "-o", tmp_path / "o.png")
    assert code == 1 and err.count("\n") == 1 and "AITHRIVING_BASE_URL has" in err, err
    assert "POST" not in err and url not in err  # nothing sent, and the value is not echoed


def test_missing_key_names_the_key_file_it_looked_in(tmp_path, standin, monkeypatch, capsys):
    monkeypatch.setenv("AITHRIVING_BASE_URL", standin.url)
    monkeypatch.setenv("AITHRIVING_API_KEY_FILE", str(tmp_path / "my-key"))
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "o.png")
    assert code == 1 and err.startswith("error: No API key found") and str(tmp_path / "my-key") in err
    assert standin.requests == []


def test_verbose_logs_each_request_retry_and_answer_without_the_key(tmp_path, standin, env_for, capsys):
    env_for(standin)
    standin.script(Respond(503))
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    code, out, err = run(
        capsys, "-v", "generate", source, "--prompt", "x", "-o", tmp_path / "o.png", "--seed", "4"
    )
    assert code == 0, err
    assert re.search(r"POST http://127\.0\.0\.1:\d+/api/control/structure, attempt 1, \d+ bytes", err)
    assert re.search(r"attempt 1: HTTP 503 after \d+\.\d\d s, request id \S+", err)
    assert "retrying in" in err
    assert re.search(r"attempt 2: HTTP 200 after \d+\.\d\d s, request id \S+", err)
    # run() has checked the key is in neither stream; no other library's records either.
    assert "urllib3" not in err


@pytest.mark.posix_only(
    "it reads the progress line through a pseudo-terminal (pty), which Windows does not have"
)
def test_progress_line_fits_the_terminal(tmp_path):
    import pty

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        write_png(
            inputs / f"a_rather_long_file_name_for_the_progress_line_{i}.png", photo_like(96, 80, seed=i)
        )
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "structure_api",
            "batch",
            str(inputs),
            "-o",
            str(tmp_path / "out"),
            "--prompt",
            "x",
            "--offline",
        ],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=_subprocess_env(COLUMNS="50"),
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the pty closes when the process ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=60)
    os.close(leader)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, text
    frames = [frame for line in text.split("\n") for frame in line.split("\r") if frame.strip()]
    bars = [frame for frame in frames if frame.startswith("[")]
    assert bars and all(len(frame) <= 49 for frame in bars), bars


def test_results_with_the_store_off_or_empty(tmp_path, monkeypatch, capsys):
    code, out, err = run(capsys, "results")  # the test environment turns the store off
    assert code == 0 and "The result store is off (AITHRIVING_CACHE_DIR=off)" in out
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", str(tmp_path / "store"))
    code, out, err = run(capsys, "results", "--export", tmp_path / "rescued")
    assert code == 0 and out.startswith("No paid results are waiting in ")


def test_an_answer_in_another_format_is_never_written_under_the_asked_extension(
    tmp_path, standin, env_for, capsys
):
    import base64

    env_for(standin)
    source = write_png(tmp_path / "in.png", photo_like(100, 100))
    # The service answers a PNG although a JPEG was asked for.
    answer = base64.b64encode(
        write_png(tmp_path / "answer.png", photo_like(100, 100, seed=3)).read_bytes()
    ).decode()
    standin.script(Respond(200, body={"code": 0, "message": "success", "data": {"image": answer, "seed": 5}}))
    code, out, err = run(capsys, "generate", source, "--prompt", "x", "-o", tmp_path / "out.jpg")
    assert code == 0, err
    with Image.open(tmp_path / "out.jpg") as written:
        assert written.format == "JPEG" and written.size == (100, 100)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["serve"], "interrupted: the stand-in stopped (it charges nothing)"),
        (["results"], "this command sends no request, so nothing was charged"),
        (
            ["generate", "in.png", "-o", "out.png", "--prompt", "x", "--offline"],
            "the stand-in charges nothing",
        ),
        (["batch", "in", "-o", "out", "--prompt", "x", "--offline"], "the stand-in charges nothing"),
        (
            ["generate", "in.png", "-o", "out.png", "--prompt", "x"],
            "a request in flight may have been charged",
        ),
    ],
)
def test_a_ctrl_c_says_truly_what_it_may_have_cost(monkeypatch, capsys, argv, says):
    # Only a request to the paid service can be charged: serve, results and --offline say so, not "may have".
    from structure_api.cli import EXIT_INTERRUPTED, main
    from structure_api.cli import args as cli_args

    def interrupted(args):
        raise KeyboardInterrupt

    for name in ("cmd_generate", "cmd_batch", "cmd_results", "cmd_serve"):
        monkeypatch.setattr(cli_args, name, interrupted)
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert says in err
    assert ("may have been charged" in err) == ("--offline" not in argv and argv[0] in ("generate", "batch"))


@pytest.mark.parametrize(
    "old, new", [("--local", "--offline"), ("--no-cache", "--no-store")]
)  # old spellings
def test_old_option_names_still_work_and_say_the_new_one(tmp_path, capsys, old, new):
    source = write_png(tmp_path / "in.png", photo_like(96, 96))
    argv = ["generate", source, "--prompt", "x", "-o", tmp_path / "out.png", "--local"]  # old spelling
    if old != "--local":  # old spelling
        argv.append(old)
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert f"{old} is now {new}" in err
    assert "· 0 credits (free stand-in) ·" in out


@pytest.mark.parametrize("host", ["0", "0.0.0.0", "::ffff:0.0.0.0", "::", "[::]", "", "0x0"])
def test_serve_refuses_every_spelling_of_all_interfaces_in_one_line(host, capsys):
    with pytest.raises(SystemExit) as caught:
        run(capsys, "serve", "--host", host)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "does not listen on all interfaces" in err and "127.0.0.1" in err


def test_the_standin_listens_on_loopback_unless_told_otherwise():
    from structure_api.standin import StandInServer

    with StandInServer() as server:
        assert server.host == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    for host in ("0", "::ffff:0.0.0.0", "0.0.0.0"):
        with pytest.raises(ValueError, match="does not listen on all interfaces"):
            StandInServer(host=host)
