"""Bad inputs from the user's side, through the node's logic (generate_images) and the CLI.

Each must end in a clear one-line message and no request, or in a valid request (which the
stand-in, checking like the service, accepts) and a well-formed result; never in an exception
from deep inside numpy, Pillow or torch. Property tests (hypothesis) cover shapes, dtypes,
values and texts beyond the named cases.
"""

from __future__ import annotations

import io
import math
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from structure_api import StructureClient
from structure_api.cli import main
from structure_api.client import MAX_SEED, validate_params
from structure_api.errors import InputError, InvalidImageError, StructureError
from structure_api.images import MAX_ASPECT, MAX_PIXELS, MIN_SIDE, decode_image
from structure_api.pipeline import StructureParams, generate_images
from structure_api.standin import StandInServer
from structure_api.store import ResultStore

from .probes import CANARY_KEY, image_file_bytes, message_problems, photo_like

PROMPT = "a stone bridge over a river"
EMOJI_PROMPT = "🏰🌉🌊 " * 300 + "👩‍👩‍👧‍👦 e\u0301 Ω ﷺ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u202eRTL\u202c"


def _tensor(shape, fill=0.5, dtype=torch.float32):
    return torch.full(shape, fill, dtype=dtype)


def _grey_ramp(count=1, height=64, width=64, channels=3):
    ramp = torch.linspace(0, 1, width).repeat(count, height, 1)[..., None]
    return ramp.repeat(1, 1, 1, channels)


def _with_specials(values):
    image = _grey_ramp()
    image[0, :8] = values
    return image


# --- the node's logic ----------------------------------------------------------------------------

# name: (images, StructureParams overrides, expected) where expected is ("ok", output shape) or (error, words)
NODE_CASES = {
    "empty batch [0, 64, 64, 3]": (_tensor((0, 64, 64, 3)), {}, (InvalidImageError, "batch is empty")),
    "0-high images [1, 0, 64, 3]": (_tensor((1, 0, 64, 3)), {}, (InvalidImageError, "at least one pixel")),
    "0-wide images [2, 64, 0, 3]": (_tensor((2, 64, 0, 3)), {}, (InvalidImageError, "at least one pixel")),
    "5 channels": (_tensor((1, 64, 64, 5)), {}, (InvalidImageError, "5 channels")),
    "0 channels": (_tensor((1, 64, 64, 0)), {}, (InvalidImageError, "0 channels")),
    "2-D array (no channels, no batch)": (
        _tensor((64, 64)),
        {},
        (InvalidImageError, "shaped [batch, height"),
    ),
    "5-D array": (_tensor((1, 1, 64, 64, 3)), {}, (InvalidImageError, "shaped [batch, height")),
    "1 channel (grey)": (_grey_ramp(channels=1), {}, ("ok", (1, 64, 64, 3))),
    "2 channels (grey + alpha)": (_grey_ramp(channels=2), {}, ("ok", (1, 64, 64, 3))),
    "4 channels (RGBA)": (_grey_ramp(channels=4), {}, ("ok", (1, 64, 64, 3))),
    "one image without a batch axis [64, 64, 3]": (_grey_ramp()[0], {}, ("ok", (1, 64, 64, 3))),
    "NaN everywhere": (_tensor((1, 64, 64, 3), math.nan), {}, ("ok", (1, 64, 64, 3))),
    "+inf and -inf rows": (
        _with_specials(torch.tensor([math.inf, -math.inf, math.inf])),
        {},
        ("ok", (1, 64, 64, 3)),
    ),
    "values far outside 0..1 (-3 and 7.5)": (
        _with_specials(torch.tensor([-3.0, 7.5, 1e30])),
        {},
        ("ok", (1, 64, 64, 3)),
    ),
    "float16 batch": (_grey_ramp().half(), {}, ("ok", (1, 64, 64, 3))),
    "bfloat16 batch": (_grey_ramp().bfloat16(), {}, ("ok", (1, 64, 64, 3))),
    "float64 numpy batch": (_grey_ramp().double().numpy(), {}, ("ok", (1, 64, 64, 3))),
    "tensor that requires grad": (_grey_ramp().requires_grad_(True), {}, ("ok", (1, 64, 64, 3))),
    "complex numpy batch": (np.zeros((1, 64, 64, 3), np.complex64), {}, (InvalidImageError, "complex64")),
    "object numpy batch": (np.full((1, 64, 64, 3), None, dtype=object), {}, (InvalidImageError, "object")),
    "1x1 image": (_tensor((1, 1, 1, 3), 0.25), {}, ("ok", (1, 1, 1, 3))),
    "20000x10 image": (_grey_ramp(height=10, width=20000), {}, ("ok", (1, 10, 20000, 3))),
    "10x20000 image": (_tensor((1, 20000, 10, 3), 0.7), {}, ("ok", (1, 20000, 10, 3))),
    "20000x10 image with outside_limits='fail'": (
        _grey_ramp(height=10, width=20000),
        {"outside_limits": "fail"},
        (InvalidImageError, "outside the service's limits"),
    ),
    "blank prompt": (_grey_ramp(), {"prompt": ""}, (InputError, "prompt is empty")),
    "prompt of spaces and newlines": (_grey_ramp(), {"prompt": " \n\t  "}, (InputError, "prompt is empty")),
    "prompt of 10001 characters": (_grey_ramp(), {"prompt": "a" * 10001}, (InputError, "10001 characters")),
    "prompt of exactly 10000 characters": (_grey_ramp(), {"prompt": "b" * 10000}, ("ok", (1, 64, 64, 3))),
    "prompt full of emoji, ZWJ sequences, combining marks, RTL override": (
        _grey_ramp(),
        {"prompt": EMOJI_PROMPT},
        ("ok", (1, 64, 64, 3)),
    ),
    "prompt with NUL": (_grey_ramp(), {"prompt": "a\x00b"}, (InputError, "U+0000")),
    "prompt with an ANSI escape": (_grey_ramp(), {"prompt": "red \x1b[31mbridge"}, (InputError, "U+001B")),
    "prompt with DEL": (_grey_ramp(), {"prompt": "bridge\x7f"}, (InputError, "U+007F")),
    "prompt with a lone surrogate": (_grey_ramp(), {"prompt": "bridge \ud800"}, (InputError, "U+D800")),
    "prompt that is not text (bytes)": (_grey_ramp(), {"prompt": b"bridge"}, (InputError, "must be text")),
    "negative prompt of 10001 characters": (
        _grey_ramp(),
        {"negative_prompt": "n" * 10001},
        (InputError, "negative_prompt is 10001"),
    ),
    "control_strength -0.01": (_grey_ramp(), {"control_strength": -0.01}, (InputError, "between 0 and 1")),
    "control_strength 1.5": (_grey_ramp(), {"control_strength": 1.5}, (InputError, "between 0 and 1")),
    "control_strength NaN": (_grey_ramp(), {"control_strength": math.nan}, (InputError, "control_strength")),
    "control_strength +inf": (_grey_ramp(), {"control_strength": math.inf}, (InputError, "control_strength")),
    "control_strength True": (_grey_ramp(), {"control_strength": True}, (InputError, "control_strength")),
    "control_strength '0.5' (text)": (
        _grey_ramp(),
        {"control_strength": "0.5"},
        (InputError, "control_strength"),
    ),
    "control_strength 0 and seed max (4294967294)": (
        _grey_ramp(),
        {"control_strength": 0, "seed": MAX_SEED},
        ("ok", (1, 64, 64, 3)),
    ),
    "seed -1": (_grey_ramp(), {"seed": -1}, (InputError, "seed must be between 0")),
    "seed 4294967295": (_grey_ramp(), {"seed": MAX_SEED + 1}, (InputError, "seed must be between 0")),
    "seed 2**64": (_grey_ramp(), {"seed": 2**64}, (InputError, "seed must be between 0")),
    "seed 1.5": (_grey_ramp(), {"seed": 1.5}, (InputError, "seed must be a whole number")),
    "seed NaN": (_grey_ramp(), {"seed": math.nan}, (InputError, "seed must be a whole number")),
    "output_format 'gif'": (_grey_ramp(), {"output_format": "gif"}, (InputError, "output_format")),
    "outside_limits 'crop'": (_grey_ramp(), {"outside_limits": "crop"}, (InputError, "outside_limits")),
}


@pytest.mark.parametrize("name", list(NODE_CASES))
def test_node_logic_bad_input(name, service, new_client, ledger):
    images, overrides, (expected, detail) = NODE_CASES[name]
    values = dict(prompt=PROMPT, control_strength=0.7, seed=42)
    values.update(overrides)
    started = time.monotonic()
    try:
        outcome = generate_images(images, StructureParams(**values), client=new_client(), max_concurrency=2)
    except StructureError as error:
        outcome = error
    seconds = time.monotonic() - started
    recorded = service.requests
    if isinstance(outcome, StructureError):
        observed = f"{type(outcome).__name__}: {outcome}"
    else:
        observed = f"valid request(s): {len(recorded)} sent, output {list(outcome.images.shape)}"
    ledger.row(
        "inputs",
        f"node: {name}",
        "clear message, nothing sent" if expected != "ok" else f"valid request, output {list(detail)}",
        observed,
        requests=len(recorded),
        seconds=seconds,
    )
    ledger.count("bad_inputs")

    if expected == "ok":
        assert not isinstance(outcome, StructureError), observed
        assert tuple(outcome.images.shape) == detail
        output = np.asarray(outcome.images)
        assert output.dtype == np.float32
        assert isinstance(outcome.images, torch.Tensor) == isinstance(images, torch.Tensor)
        assert np.isfinite(output).all() and output.min() >= 0 and output.max() <= 1
        assert len(recorded) == detail[0] and all(r.status == 200 for r in recorded)
        for record in recorded:  # what was sent is within the service's limits (the stand-in checked too)
            with Image.open(io.BytesIO(record.image_bytes)) as sent:
                width, height = sent.size
                assert sent.mode == "RGB"
            assert min(width, height) >= MIN_SIDE and width * height <= MAX_PIXELS
            assert max(width, height) <= MAX_ASPECT * min(width, height)
        if "prompt" in overrides:
            assert recorded[0].fields["prompt"] == overrides["prompt"], "the prompt must arrive intact"
    else:
        assert type(outcome) is expected or isinstance(outcome, expected), observed
        assert detail in str(outcome), observed
        assert isinstance(outcome, InputError), "bad input is an InputError (also a ValueError)"
        assert message_problems(str(outcome)) == [], observed
        assert recorded == [], "nothing may be sent for a bad input"


def test_node_logic_cleans_nan_inf_and_out_of_range_values_as_documented(service, new_client, ledger):
    """NaN and -inf become 0, +inf 255, values clamp to 0..1: exactly what is uploaded."""
    image = torch.zeros((1, 64, 64, 3))
    image[0, 0, :4] = torch.tensor([math.nan, -math.inf, math.inf, 7.5])[:, None]
    image[0, 1, :2] = torch.tensor([-3.0, 0.5])[:, None]
    generate_images(image, StructureParams(prompt=PROMPT, seed=3), client=new_client())
    sent = decode_image(service.requests[0].image_bytes)
    ledger.row(
        "inputs",
        "node: NaN, -inf, +inf, 7.5, -3 and 0.5 in one image",
        "uploaded as 0, 0, 255, 255, 0 and 128",
        f"uploaded as {sent[0, :4, 0].tolist() + sent[1, :2, 0].tolist()}",
        requests=1,
    )
    ledger.count("bad_inputs")
    assert sent[0, :4, 0].tolist() == [0, 0, 255, 255] and sent[1, :2, 0].tolist() == [0, 128]


# --- property tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_service():
    with StandInServer(api_key=CANARY_KEY) as server:
        client = StructureClient(
            api_key=CANARY_KEY, base_url=server.url, sleep=lambda seconds: None, jitter=lambda: 0.0
        )
        yield server, client
        client.close()


_DTYPES = [np.float16, np.float32, np.float64, np.uint8, np.uint16, np.int32, np.int64, np.bool_]
_PROPERTY = settings(
    max_examples=120,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture(scope="module")
def property_book(module_ledger):
    """Counts each property test's examples; books them (figure and one row each) when the module ends."""
    counts: Counter = Counter()  # (test name, "sent" | "refused") -> examples
    yield counts
    descriptions = {
        "test_property_any_array_gives_a_batch_or_a_clear_input_error": (
            "arrays of any shape (0-3 images, 0-96 px, 0-6 channels), dtype and values (NaN, inf, extremes), "
            "numpy or torch (bfloat16 too), through generate_images"
        ),
        "test_property_any_text_is_refused_clearly_or_arrives_intact": (
            "any unicode prompt and negative prompt (control characters, surrogates, emoji), through "
            "generate_images"
        ),
        "test_property_numbers_are_accepted_exactly_within_the_contract": (
            "any control_strength, seed and output_format values and types"
        ),
    }
    accepted_means = {name: " (sent and answered)" for name in descriptions}
    accepted_means["test_property_numbers_are_accepted_exactly_within_the_contract"] = (
        " (validation only, no request)"
    )
    for name in sorted({name for name, _ in counts}):
        sent, refused = counts[name, "sent"], counts[name, "refused"]
        recorder = module_ledger(name)
        recorder.count("property_examples", sent + refused)
        recorder.row(
            "inputs",
            f"property (hypothesis, derandomized): {descriptions[name]}",
            "a well-formed result and valid requests, or InputError with a clean message; never "
            "another exception",
            f"{sent + refused} examples: {sent} accepted{accepted_means[name]}, "
            f"{refused} refused with a clean InputError",
        )


@st.composite
def image_batches(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    batch = draw(st.integers(0, 3))
    height = draw(st.one_of(st.integers(0, 3), st.integers(1, 96)))
    width = draw(st.one_of(st.integers(0, 3), st.integers(1, 96)))
    channels = draw(st.integers(0, 6))
    shape = (
        (batch, height, width, channels) if draw(st.booleans()) or batch != 1 else (height, width, channels)
    )
    if np.dtype(dtype).kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=np.finfo(dtype).bits)
    else:
        elements = hnp.from_dtype(np.dtype(dtype))
    array = draw(hnp.arrays(dtype, shape, elements=elements, fill=elements))
    if dtype == np.uint16 or not draw(st.booleans()):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_floating_point() and draw(st.booleans()):
        tensor = tensor.to(torch.bfloat16)
    return tensor


@_PROPERTY
@given(images=image_batches())
def test_property_any_array_gives_a_batch_or_a_clear_input_error(images, shared_service, property_book):
    """Any shape, dtype and values: a [B, H, W, 3] float32 batch in 0..1 and B requests, or InputError."""
    server, client = shared_service
    server.clear()
    name = "test_property_any_array_gives_a_batch_or_a_clear_input_error"
    try:
        # A fresh store: an identical array drawn twice would otherwise (rightly) be served free.
        result = generate_images(
            images,
            StructureParams(prompt=PROMPT, seed=9),
            client=client,
            max_concurrency=2,
            store=ResultStore(None),
        )
    except InputError as error:
        assert message_problems(str(error)) == [], str(error)
        assert server.requests == []
        _tally(property_book, name, "refused")
        return
    except StructureError as error:
        pytest.fail(f"not an input error: {error!r}")
    except Exception:  # a crash deep inside a library is exactly what this test hunts
        pytest.fail("crashed:\n" + traceback.format_exc())
    shape = tuple(images.shape)
    count, height, width = (1, *shape[:2]) if len(shape) == 3 else shape[:3]
    output = np.asarray(result.images)
    assert output.shape == (count, height, width, 3) and output.dtype == np.float32
    assert np.isfinite(output).all() and 0 <= output.min() and output.max() <= 1
    assert len(server.requests) == count and all(r.status == 200 for r in server.requests)
    _tally(property_book, name, "sent")


@_PROPERTY
@given(prompt=st.text(max_size=300), negative=st.text(max_size=40))
def test_property_any_text_is_refused_clearly_or_arrives_intact(
    prompt, negative, shared_service, property_book
):
    server, client = shared_service
    server.clear()
    name = "test_property_any_text_is_refused_clearly_or_arrives_intact"
    params = StructureParams(prompt=prompt, negative_prompt=negative, seed=5)
    try:
        generate_images(np.full((1, 64, 64, 3), 0.5, np.float32), params, client=client)
    except InputError as error:
        assert message_problems(str(error)) == [], str(error)
        assert server.requests == []
        _tally(property_book, name, "refused")
        return
    [recorded] = server.requests
    assert recorded.fields["prompt"] == prompt
    assert recorded.fields.get("negative_prompt", "") == (negative if negative.strip() else "")
    _tally(property_book, name, "sent")


@settings(
    max_examples=400,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    strength=st.one_of(
        st.floats(0, 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-5, 5),
        st.booleans(),
        st.none(),
        st.text(max_size=5),
    ),
    seed=st.one_of(
        st.integers(0, MAX_SEED),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True),
        st.booleans(),
        st.none(),
        st.text(max_size=5),
    ),
    output_format=st.sampled_from(["png", "jpeg", "webp", "PNG", "gif", "", "png "]),
)
def test_property_numbers_are_accepted_exactly_within_the_contract(
    strength, seed, output_format, property_book
):
    name = "test_property_numbers_are_accepted_exactly_within_the_contract"
    within = (
        isinstance(strength, (int, float))
        and not isinstance(strength, bool)
        and math.isfinite(strength)
        and 0 <= strength <= 1
        and isinstance(seed, int)
        and not isinstance(seed, bool)
        and 0 <= seed <= MAX_SEED
        and output_format in ("png", "jpeg", "webp")
    )
    try:
        validate_params(PROMPT, strength, "", seed, output_format)
    except InputError as error:
        assert not within, f"refused a valid combination: {error}"
        assert message_problems(str(error)) == [], str(error)
        _tally(property_book, name, "refused")
        return
    assert within
    _tally(property_book, name, "sent")


def _tally(book: Counter, name: str, outcome: str) -> None:
    book[name, outcome] += 1


# --- the CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch, service):
    monkeypatch.setenv("AITHRIVING_BASE_URL", service.url)
    monkeypatch.setenv("AITHRIVING_API_KEY", CANARY_KEY)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse rejects bad arguments with status 2
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _png_16bit(path: Path) -> Path:
    Image.fromarray((np.linspace(0, 65535, 96 * 80).reshape(80, 96)).astype(np.uint16)).save(path)
    return path


def _zero_bomb(path: Path) -> Path:
    from .test_hostile import png_bomb

    path.write_bytes(png_bomb(20000, 20000, real=False))
    return path


# name: (make input file(tmp) or None for a plain 96x80 PNG, extra argv, (exit code, words in stderr or "" )
CLI_CASES = {
    "empty input file": (lambda d: _write(d / "empty.png", b""), [], (1, "not an image this tool can read")),
    "text file named .png": (
        lambda d: _write(d / "notes.png", b"hello"),
        [],
        (1, "not an image this tool can read"),
    ),
    "PNG cut in half": (
        lambda d: _write(d / "half.png", image_file_bytes(photo_like(96, 80))[:600]),
        [],
        (1, "not an image this tool can read"),
    ),
    "1x1 PNG": (lambda d: _write(d / "dot.png", image_file_bytes(photo_like(1, 1))), [], (0, "")),
    "20000x10 PNG": (lambda d: _write(d / "strip.png", image_file_bytes(photo_like(20000, 10))), [], (0, "")),
    "grey PNG (mode L)": (
        lambda d: _write(d / "grey.png", image_file_bytes(photo_like(96, 80)[..., 0])),
        [],
        (0, ""),
    ),
    "grey + alpha PNG (mode LA)": (
        lambda d: _save(d / "la.png", Image.fromarray(photo_like(96, 80)).convert("LA")),
        [],
        (0, ""),
    ),
    "RGBA PNG": (
        lambda d: _save(d / "rgba.png", Image.fromarray(photo_like(96, 80)).convert("RGBA")),
        [],
        (0, ""),
    ),
    "palette PNG (mode P)": (
        lambda d: _save(d / "p.png", Image.fromarray(photo_like(96, 80)).convert("P")),
        [],
        (0, ""),
    ),
    "16-bit grey PNG": (lambda d: _png_16bit(d / "deep.png"), [], (0, "")),
    "CMYK JPEG": (
        lambda d: _save(d / "cmyk.jpg", Image.fromarray(photo_like(96, 80)).convert("CMYK")),
        [],
        (0, ""),
    ),
    "PNG decompression bomb (declares 20000x20000 = 400 MP)": (
        lambda d: _zero_bomb(d / "bomb.png"),
        [],
        (1, "not an image this tool can read"),
    ),
    "48 MP photo (8000x6000 JPEG): fitted, sent, brought back to 8000x6000": (
        lambda d: _save(d / "big.jpg", Image.fromarray(photo_like(800, 600)).resize((8000, 6000))),
        [],
        (0, ""),
    ),
    "missing input file": (lambda d: d / "missing.png", [], (1, "Cannot read")),
    "blank prompt": (None, ["--prompt", "  "], (2, "prompt is empty")),
    "prompt of 10001 characters": (None, ["--prompt", "x" * 10001], (2, "10001 characters")),
    "prompt full of emoji": (None, ["--prompt", EMOJI_PROMPT], (0, "")),
    "prompt with an ANSI escape": (None, ["--prompt", "a \x1b[2J bridge"], (2, "U+001B")),
    "prompt with BEL": (None, ["--prompt", "bridge\x07"], (2, "U+0007")),
    "control strength 1.5": (None, ["--control-strength", "1.5"], (2, "must be between 0 and 1")),
    "control strength -0.1": (None, ["--control-strength", "-0.1"], (2, "must be between 0 and 1")),
    "control strength nan": (None, ["--control-strength", "nan"], (2, "must be between 0 and 1")),
    "control strength inf": (None, ["--control-strength", "inf"], (2, "must be between 0 and 1")),
    "control strength 'strong'": (None, ["--control-strength", "strong"], (2, "must be a number")),
    "control strength 0": (None, ["--control-strength", "0"], (0, "")),
    "seed -1": (None, ["--seed", "-1"], (2, "--seed: must be from 0 to 4294967294")),
    "seed 4294967295": (None, ["--seed", "4294967295"], (2, "--seed: must be from 0 to 4294967294")),
    "seed of 30 digits": (None, ["--seed", "9" * 30], (2, "--seed: must be from 0 to 4294967294")),
    "seed 1e3": (None, ["--seed", "1e3"], (2, "--seed: must be a whole number")),
    "seed 4294967294": (None, ["--seed", "4294967294"], (0, "")),
    "format gif": (None, ["--format", "gif"], (2, "invalid choice")),
    "timeout -1": (None, ["--timeout", "-1"], (2, "--timeout: must be a positive number of seconds")),
    "timeout 0": (None, ["--timeout", "0"], (2, "--timeout: must be a positive number of seconds")),
    "timeout nan": (None, ["--timeout", "nan"], (2, "--timeout: must be a positive number of seconds")),
    "timeout inf": (None, ["--timeout", "inf"], (2, "--timeout: must be a positive number of seconds")),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input(name, tmp_path, cli_env, service, capsys, ledger):
    make_input, extra, (expected_code, words) = CLI_CASES[name]
    source = (
        make_input(tmp_path)
        if make_input
        else _write(tmp_path / "in.png", image_file_bytes(photo_like(96, 80)))
    )
    target = tmp_path / "out" / "result.png"
    argv = ["generate", source, "-o", target]
    if "--prompt" not in extra:
        argv += ["--prompt", PROMPT]
    argv += extra
    started = time.monotonic()
    code, out, err = run_cli(capsys, *argv)
    seconds = time.monotonic() - started
    observed = f"exit {code}: {(err.strip().splitlines() or [out.strip()])[-1][:300]}".replace(
        str(tmp_path), "…"
    )
    ledger.row(
        "inputs",
        f"CLI: {name}",
        f"exit {expected_code}" + (f', "…{words}…"' if words else ""),
        observed,
        requests=len(service.requests),
        seconds=seconds,
    )
    ledger.count("bad_inputs")

    assert "Traceback" not in err and CANARY_KEY not in out + err
    assert code == expected_code, err
    assert words in err, err
    if expected_code == 0:
        assert target.is_file() and len(service.requests) == 1
        with Image.open(source) as original, Image.open(target) as written:
            assert written.size == original.size
    else:
        assert not target.exists() and service.requests == []
        # One line in one style, whether argparse or our own validation refused the value.
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_cli_batch_of_broken_and_good_files(tmp_path, cli_env, service, capsys, ledger):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a_good.png", image_file_bytes(photo_like(96, 80, seed=1)))
    _write(folder / "b_empty.png", b"")
    _write(folder / "c_text.jpg", b"not a jpeg")
    _write(folder / "d_good.webp", image_file_bytes(photo_like(80, 96, seed=2), "WEBP"))
    (folder / "e_folder.png").mkdir()
    code, out, err = run_cli(
        capsys, "batch", folder, "-o", tmp_path / "out", "--prompt", PROMPT, "--seed", "3"
    )
    ledger.row(
        "inputs",
        "CLI batch: 2 good images, an empty file, a text file, a folder named .png",
        "good ones written, each bad one named with its reason, exit 1",
        f"exit {code}: {out.strip()}; {err.count('failed:')} failures named",
        requests=len(service.requests),
    )
    ledger.count("bad_inputs", 3)
    assert code == 1 and out.strip() == "done 2, failed 2, skipped 0, credits 12"
    assert "failed: b_empty.png:" in err and "failed: c_text.jpg:" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.png", "d_good.png"]


def test_cli_batch_of_an_empty_folder(tmp_path, cli_env, service, capsys, ledger):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "batch", tmp_path / "empty", "-o", tmp_path / "out", "--prompt", PROMPT)
    ledger.row(
        "inputs",
        "CLI batch: empty folder",
        'exit 1, "…no .png…"',
        f"exit {code}: {err.strip()}".replace(str(tmp_path), "…"),
        requests=len(service.requests),
    )
    ledger.count("bad_inputs")
    assert code == 1 and "holds no .png" in err and service.requests == []
