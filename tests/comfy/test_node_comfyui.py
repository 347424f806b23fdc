"""The Structure node in a real ComfyUI 0.3.75, against the stand-in on loopback."""

from __future__ import annotations

import ast
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from structure_api import StructureClient, StructureRequest
from structure_api.images import encode_upload
from structure_api.standin import Hang, Respond, StandInServer
from support import TEST_KEY
from tests.comfy.harness import ComfyServer, PromptRejected, execution_error, saved_images, workflow_to_api

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
EXAMPLE = REPO / "example_workflows" / "structure_example.png"
NODE = "AIThrivingStructure"


# Both depend on comfy_install so that each ComfyUI of the matrix gets its own: a store shared
# across versions would serve the second version's fixed-seed runs from the first one's results.
@pytest.fixture(scope="module")
def standin(comfy_install):
    with StandInServer(api_key=TEST_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def cache_dir(comfy_install, tmp_path_factory):
    return tmp_path_factory.mktemp("structure-cache")


def _env(standin: StandInServer, cache_dir: Path) -> dict:
    return {
        "AITHRIVING_BASE_URL": standin.url,
        "AITHRIVING_API_KEY": TEST_KEY,
        "AITHRIVING_CACHE_DIR": str(cache_dir),
    }


@pytest.fixture(scope="module")
def comfy(comfy_install, standin, cache_dir, tmp_path_factory):
    server = ComfyServer(
        comfy_install, env=_env(standin, cache_dir), base_dir=tmp_path_factory.mktemp("comfy-node-base")
    )
    with server:
        # Nothing uploaded: the pack put the templates' picture into the (fresh) input folder when it
        # loaded, which every graph here and every example workflow loads.
        assert (server.input_dir / EXAMPLE.name).read_bytes() == EXAMPLE.read_bytes()
        yield server


@pytest.fixture(autouse=True)
def fresh_standin(standin):
    standin.clear()
    yield


def graph(
    prompt: str = "a watercolor cottage", seed: int = 1234, repeat: int = 1, prefix: str = "t", **node_inputs
) -> dict:
    inputs = {
        "image": ["2", 0],
        "prompt": prompt,
        "control_strength": 0.7,
        "seed": seed,
        "output_format": "png",
        "outside_limits": "fit and restore size",
        "negative_prompt": "",
    }
    inputs.update(node_inputs)
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "structure_example.png"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": repeat}},
        "3": {"class_type": NODE, "inputs": inputs},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def saved_pixels(server: ComfyServer, entry: dict) -> list[np.ndarray]:
    return [
        np.asarray(
            Image.open(io.BytesIO(server.view(i["filename"], i["subfolder"], i["type"]))).convert("RGB")
        )
        for i in saved_images(entry)
    ]


def expected_pixels(standin: StandInServer, seed: int, prompt: str = "a watercolor cottage") -> np.ndarray:
    """What the stand-in answers for the example image with these parameters (it is deterministic)."""
    pixels = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    with StructureClient(api_key=TEST_KEY, base_url=standin.url) as client:
        result = client.generate(
            StructureRequest(image=encode_upload(pixels), prompt=prompt, seed=seed, control_strength=0.7)
        )
    return result.pixels


def edge_map(pixels: np.ndarray, block: int = 8) -> np.ndarray:
    """Luminance gradient magnitude pooled over 8x8 blocks (the stand-in draws edges a few px wide)."""
    gy, gx = np.gradient(pixels.astype(np.float32).mean(axis=-1))
    magnitude = np.hypot(gx, gy)
    h, w = (magnitude.shape[0] // block) * block, (magnitude.shape[1] // block) * block
    return magnitude[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))


def assert_same_image(saved: np.ndarray, expected: np.ndarray) -> None:
    # SaveImage turns floats into bytes by truncating 255*x, so a value may come out one lower
    # than the service's byte; anything more would be a real difference.
    assert saved.shape == expected.shape
    assert np.abs(saved.astype(int) - expected.astype(int)).max() <= 1


def test_object_info_lists_the_node_with_its_inputs(comfy):
    info = comfy.object_info(NODE)
    assert info["display_name"] == "Structure (AIThriving)"
    assert info["category"] == "image/AIThriving"
    assert info["description"] and not info.get("api_node")
    required, optional = info["input"]["required"], info["input"]["optional"]
    assert list(required) == [
        "image",
        "prompt",
        "control_strength",
        "seed",
        "output_format",
        "outside_limits",
    ]
    assert list(optional) == ["negative_prompt"]
    assert required["image"][0] == "IMAGE"
    assert required["prompt"][0] == "STRING" and required["prompt"][1]["multiline"]
    strength = required["control_strength"][1]
    assert (strength["min"], strength["max"], strength["step"], strength["default"]) == (0.0, 1.0, 0.01, 0.7)
    seed = required["seed"][1]
    assert (seed["min"], seed["max"], seed["control_after_generate"]) == (0, 4294967294, True)
    assert required["output_format"][1]["options"] == ["png", "jpeg", "webp"]
    assert required["output_format"][1]["default"] == "png"
    assert required["outside_limits"][1]["default"] == "fit and restore size"
    assert optional["negative_prompt"][1]["multiline"]
    for spec in [*required.values(), *optional.values()]:
        assert spec[1].get("tooltip"), spec
    assert info["output"] == ["IMAGE", "INT"] and info["output_name"] == ["IMAGE", "seed"]
    # No key input of any kind, and no Comfy-account hidden inputs.
    names = json.dumps(info["input"]).lower()
    assert "key" not in names and "auth" not in names


def schema_fields_of(install) -> set[str]:
    """The fields of io.Schema in this ComfyUI's own source (read, not imported: the server's view)."""
    source = install.comfy_dir / "comfy_api" / "latest" / "_io.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    [schema] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Schema"]
    return {
        n.target.id for n in schema.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def test_search_aliases_where_the_server_has_them(comfy, comfy_install):
    # ComfyUI 0.11 and later take search aliases (words the node search also matches); older
    # servers' Schema has no such field, and the node must load there all the same.
    info = comfy.object_info(NODE)
    fields = schema_fields_of(comfy_install)
    assert {"node_id", "display_name", "description"} <= fields  # the Schema was really read
    if "search_aliases" in fields:
        assert info["search_aliases"] == [
            "controlnet",
            "structure",
            "sketch to image",
            "depth",
            "edges",
            "img2img",
            "aithriving",
        ]
    else:
        assert info["display_name"] == "Structure (AIThriving)" and not info.get("search_aliases")


def test_single_image_saves_the_services_image(comfy, standin):
    entry = comfy.run(graph(seed=1234, prefix="single"))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    [saved] = saved_pixels(comfy, entry)
    assert saved.shape == (512, 768, 3)
    [request] = standin.requests
    assert request.fields["seed"] == "1234" and request.headers["authorization"] == TEST_KEY
    # The cost of the run travels to the frontend as the node's UI output.
    [cost] = entry["outputs"]["3"]["aithriving_cost"]
    assert cost == {
        "credits": 6,
        "images": 1,
        "from_store": 0,
        "credits_per_image": 6,
        "seeds": [1234],
        "offline": False,
        "free": False,
    }
    assert_same_image(saved, expected_pixels(standin, 1234))
    # ... and that image keeps the input's structure: its edges line up with the input's.
    source = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    assert np.corrcoef(edge_map(source).ravel(), edge_map(saved).ravel())[0, 1] > 0.5


def test_batch_of_8_in_order_with_seeds_s_to_s_plus_7(comfy, standin):
    entry = comfy.run(graph(seed=900, repeat=8, prefix="batch8"))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    assert sorted(int(r.fields["seed"]) for r in standin.requests) == list(range(900, 908))
    saved = saved_pixels(comfy, entry)
    assert len(saved) == 8
    standin.clear()
    for offset, image in enumerate(saved):
        assert_same_image(image, expected_pixels(standin, 900 + offset))


def test_service_error_reaches_comfyuis_error_report(comfy, standin):
    standin.script(Respond(402))
    entry = comfy.run(graph(seed=31, prefix="err"))
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error["node_type"] == NODE
    assert error["exception_message"].startswith("Your account is out of credits (HTTP 402)")
    assert TEST_KEY not in json.dumps(entry)


def test_bad_prompt_is_reported_before_any_request(comfy, standin):
    # Refused when queued (validate_inputs), before the image loader or anything else runs.
    with pytest.raises(PromptRejected, match="prompt is empty"):
        comfy.queue_prompt(graph(prompt="   ", seed=32, prefix="blank"))
    assert standin.requests == []


def test_interrupt_ends_a_slow_request_within_a_second(comfy, standin):
    standin.script(Hang())
    prompt_id = comfy.queue_prompt(graph(seed=33, prefix="cancel"))
    deadline = time.monotonic() + 30
    while not standin.requests:  # the request is in flight, waiting on the service
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    comfy.interrupt()
    entry = comfy.wait_for(prompt_id, timeout=10, poll_interval=0.02)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, elapsed
    kinds = [message[0] for message in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_error" not in kinds


def test_repeated_fixed_seed_run_is_not_paid_twice_even_after_restart(
    comfy_install, standin, cache_dir, tmp_path_factory
):
    # A separate server pair on one cache folder: the second stands for a restart of ComfyUI.
    for round_number in range(2):
        server = ComfyServer(
            comfy_install,
            env=_env(standin, cache_dir),
            base_dir=tmp_path_factory.mktemp(f"comfy-restart-{round_number}"),
        )
        with server:
            server.upload_image(EXAMPLE, "structure_example.png")
            entry = server.run(graph(seed=4242, repeat=2, prefix="cached"))
            assert entry["status"]["status_str"] == "success", execution_error(entry)
        assert len(standin.requests) == 2  # the first round paid for two; the second sent nothing


def test_seed_0_batch_with_a_failing_image_queued_twice_pays_only_for_that_image(comfy, standin):
    """Seed 0, a batch of 4 with one failure: the 3 paid results are kept, and the re-queue pays for 1."""
    workflow = graph(prompt="a seed-0 batch that fails once", seed=0, repeat=4, prefix="seed0retry")
    credits_before = standin.credits_spent
    standin.script(Respond(200, body={"code": -1, "message": "Generation failed, please try again."}))
    first = comfy.run(workflow)
    assert first["status"]["status_str"] == "error"
    message = execution_error(first)["exception_message"]
    assert message.startswith("1 of 4 images failed: image ") and "Generation failed" in message
    assert "3 images were paid for (18 credits); all 3 are kept in the result store" in message
    assert "so queuing again pays only for the failed ones" in message
    assert standin.credits_spent - credits_before == 18 and len(standin.requests) == 4
    standin.clear()

    second = comfy.run(workflow)  # the same request queued again, seed still 0
    assert second["status"]["status_str"] == "success", execution_error(second)
    assert len(standin.requests) == 1 and standin.credits_spent - credits_before == 18 + 6
    assert len(saved_images(second)) == 4
    cost = next(iter(second["outputs"]["3"]["aithriving_cost"]))
    assert (cost["credits"], cost["from_store"], cost["images"]) == (6, 3, 4)


def test_no_trace_of_the_key_in_saved_files_or_history(comfy, standin):
    workflow = json.loads((REPO / "example_workflows" / "structure_basic.json").read_text())
    entry = comfy.run(graph(seed=34, prefix="secret"), workflow=workflow)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    for image in saved_images(entry):
        data = comfy.view(image["filename"], image["subfolder"], image["type"])
        assert TEST_KEY.encode() not in data
        text_chunks = Image.open(io.BytesIO(data)).text
        assert "prompt" in text_chunks and "workflow" in text_chunks  # SaveImage did embed the graph ...
        assert TEST_KEY not in json.dumps(text_chunks)  # ... and the key is not in it
    assert TEST_KEY not in json.dumps(comfy.history()) and TEST_KEY not in json.dumps(comfy.queue())
    assert TEST_KEY not in comfy.log_text()
    for path in comfy.base_dir.rglob("*"):
        if path.is_file() and not path.is_symlink() and "custom_nodes" not in path.parts:
            assert TEST_KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_each_example_workflow_runs(comfy, standin, workflow_path):
    workflow = json.loads(workflow_path.read_text())
    assert TEST_KEY not in json.dumps(workflow) and "api_key" not in json.dumps(workflow).lower()
    api = workflow_to_api(workflow, comfy.object_info(), strict=True)
    entry = comfy.run(api, workflow=workflow)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    outputs = saved_images(entry)
    node = next(n for n in workflow["nodes"] if n["type"] == NODE)
    seed = node["widgets_values"][2]
    saves = [i for i in outputs if i["type"] == "output"]
    sizes = [Image.open(io.BytesIO(comfy.view(i["filename"], i["subfolder"], i["type"]))).size for i in saves]
    if workflow_path.stem == "structure_batch":
        assert len(saves) == 4 and set(sizes) == {(768, 512)}
        assert sorted(int(r.fields["seed"]) for r in standin.requests) == [seed + i for i in range(4)]
    elif workflow_path.stem == "structure_hybrid":
        assert sizes == [(384, 256)]  # scaled by 0.5 locally before the call; blended after it
        assert len(standin.requests) == 1
    else:
        assert sizes == [(768, 512)] and len(standin.requests) == 1
