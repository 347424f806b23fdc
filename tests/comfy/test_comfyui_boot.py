"""The harness itself, against a real ComfyUI 0.3.75: boot, core nodes, a graph end to end, clean shutdown."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.comfy.harness import (
    PACK_LINK_NAME,
    REPO_ROOT,
    TORCHVISION_STUB_DIR,
    ComfyServerError,
    PromptRejected,
    exclusive_lock,
    execution_error,
    saved_images,
    workflow_to_api,
)


def quadrants_png(width: int = 64, height: int = 64) -> tuple[bytes, np.ndarray]:
    """An RGB PNG with four flat quadrants and a gradient strip: ``(png bytes, [H, W, 3] uint8)``."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    half_h, half_w = height // 2, width // 2
    pixels[:half_h, :half_w] = (255, 0, 0)
    pixels[:half_h, half_w:] = (0, 255, 0)
    pixels[half_h:, :half_w] = (0, 0, 255)
    pixels[half_h:, half_w:] = (30, 60, 90)
    pixels[:, :4, 0] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]  # every red level in one strip
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue(), pixels


def test_object_info_lists_core_nodes(comfy_server):
    info = comfy_server.object_info()
    for node in ("LoadImage", "SaveImage", "ImageScale", "ImageInvert"):
        assert node in info, f"{node} missing from /object_info"
    assert comfy_server.object_info("LoadImage")["input"]["required"]["image"][1].get("image_upload") is True
    assert comfy_server.object_info("NoSuchNode") == {}


def test_pack_is_linked_and_import_attempted(comfy_server):
    link = comfy_server.custom_nodes_dir / PACK_LINK_NAME
    assert link.is_symlink() and link.resolve() == REPO_ROOT
    status = comfy_server.custom_node_import_status()
    # Whether the pack itself imports is the node tests' business; here only that ComfyUI tried.
    assert status in ("loaded", "failed"), comfy_server.log_text()[-3000:]
    if status == "failed":
        warnings.warn(
            f"ComfyUI could not import the pack {PACK_LINK_NAME} (see the server log)", stacklevel=1
        )


def test_invert_graph_end_to_end(comfy_server):
    png, pixels = quadrants_png()
    name = comfy_server.upload_image(png, "harness-quadrants.png")
    assert (comfy_server.input_dir / name).read_bytes() == png
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "harness/invert"}},
    }
    workflow = {"note": "stands in for the UI workflow", "nodes": [], "links": []}

    entry = comfy_server.run(graph, timeout=120, workflow=workflow)

    assert entry["status"]["status_str"] == "success", execution_error(entry)
    [image] = saved_images(entry)
    assert image["type"] == "output" and image["subfolder"] == "harness"
    assert (comfy_server.output_dir / image["subfolder"] / image["filename"]).is_file()
    saved = Image.open(io.BytesIO(comfy_server.view(image["filename"], image["subfolder"], "output")))
    result = np.asarray(saved.convert("RGB")).astype(int)
    # SaveImage truncates 255*(1 - v/255) to uint8, so a value can land one below 255 - v.
    assert np.abs(result - (255 - pixels.astype(int))).max() <= 1
    embedded = json.loads(saved.text["prompt"])
    # ComfyUI adds its own bookkeeping (LoadImage gets "is_changed": [file hash]) to the saved prompt.
    assert {k: (v["class_type"], v["inputs"]) for k, v in embedded.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in graph.items()
    }
    assert json.loads(saved.text["workflow"]) == workflow
    assert comfy_server.history()[entry["prompt"][1]]["status"]["status_str"] == "success"


def test_ui_workflow_converts_and_runs(comfy_server):
    """A hand-written UI-format workflow (as the 0.3.75 frontend saves it) through workflow_to_api."""
    png, pixels = quadrants_png()
    name = comfy_server.upload_image(png, "harness-scale.png")
    ui_workflow = {
        "last_node_id": 4,
        "last_link_id": 3,
        "nodes": [
            {
                "id": 1,
                "type": "LoadImage",
                "mode": 0,
                "inputs": [],
                "outputs": [
                    {"name": "IMAGE", "type": "IMAGE", "links": [1]},
                    {"name": "MASK", "type": "MASK", "links": []},
                ],
                # The upload button's value "image" is saved after the file name.
                "widgets_values": [name, "image"],
            },
            {
                "id": 2,
                "type": "ImageScale",
                "mode": 0,
                "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}],
                "widgets_values": ["nearest-exact", 32, 48, "disabled"],
            },
            # Bypassed: the converter wires ImageScale straight to SaveImage.
            {
                "id": 4,
                "type": "ImageInvert",
                "mode": 4,
                "inputs": [{"name": "image", "type": "IMAGE", "link": 2}],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [3]}],
                "widgets_values": [],
            },
            {
                "id": 3,
                "type": "SaveImage",
                "mode": 0,
                "inputs": [{"name": "images", "type": "IMAGE", "link": 3}],
                "outputs": [],
                "widgets_values": ["harness/scaled"],
            },
            {"id": 5, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["a note"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 4, 0, "IMAGE"], [3, 4, 0, 3, 0, "IMAGE"]],
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }

    graph = workflow_to_api(ui_workflow, comfy_server.object_info(), strict=True)

    assert graph == {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}, "_meta": {"title": "Load Image"}},
        "2": {
            "class_type": "ImageScale",
            "_meta": {"title": "Upscale Image"},
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "nearest-exact",
                "width": 32,
                "height": 48,
                "crop": "disabled",
            },
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "harness/scaled"},
            "_meta": {"title": "Save Image"},
        },
    }
    entry = comfy_server.run(graph, timeout=120, workflow=ui_workflow)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    [image] = saved_images(entry)
    saved = Image.open(io.BytesIO(comfy_server.view(image["filename"], image["subfolder"])))
    assert saved.size == (32, 48)
    result = np.asarray(saved.convert("RGB"))
    # Nearest-neighbour keeps the flat quadrants' colours exactly away from the edges.
    assert result.shape == (48, 32, 3)
    assert tuple(result[5, 10]) == (255, 0, 0)
    assert tuple(result[5, 20]) == (0, 255, 0)
    assert tuple(result[40, 28]) == (30, 60, 90)
    assert json.loads(saved.text["workflow"]) == ui_workflow


def test_invalid_prompt_is_rejected_with_node_errors(comfy_server):
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "no-such-file.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    with pytest.raises(PromptRejected) as caught:
        comfy_server.queue_prompt(graph)
    assert "1" in caught.value.node_errors
    assert "no-such-file.png" in str(caught.value)


def test_failing_node_reports_execution_error(comfy_server):
    # Validation only checks that the file exists; decoding it fails when the node runs.
    name = comfy_server.upload_image(b"not an image at all", "harness-broken.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness/broken"}},
    }

    entry = comfy_server.run(graph, timeout=120)

    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error["node_id"] == "1" and error["node_type"] == "LoadImage"
    assert error["exception_message"]
    assert saved_images(entry) == []
    assert comfy_server.queue() == {"queue_running": [], "queue_pending": []}
    comfy_server.interrupt()  # nothing running: must be harmless


def test_server_env_is_scrubbed_and_extended(comfy_server_factory, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("AITHRIVING_API_KEY", "developer-key-must-not-leak")
    server = comfy_server_factory(
        env={"AITHRIVING_BASE_URL": "http://127.0.0.1:1", "AITHRIVING_API_KEY": "test-key"}
    )
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{server.pid}/environ").read_text().split("\0")
        if "=" in item
    )
    assert environ["AITHRIVING_BASE_URL"] == "http://127.0.0.1:1"
    assert environ["AITHRIVING_API_KEY"] == "test-key"
    assert "HTTPS_PROXY" not in environ
    # Another version's overlay (0.3.52's or 0.33.0's packages) comes first, then the torchvision stand-in.
    assert environ["PYTHONPATH"].split(os.pathsep) == [
        *map(str, server.install.python_path),
        str(TORCHVISION_STUB_DIR),
    ]
    assert Path(environ["HOME"]).is_relative_to(server.base_dir)
    assert server.custom_node_import_status() in ("loaded", "failed")


def test_stop_leaves_no_process(comfy_server_factory):
    server = comfy_server_factory()
    pid = server.pid
    server.stop()
    assert not server.is_running()
    assert not Path(f"/proc/{pid}").exists(), "the ComfyUI process is still there (or a zombie)"
    server.stop()  # idempotent


def test_start_failure_reports_log_tail(comfy_server_factory):
    with pytest.raises(ComfyServerError, match="unrecognized arguments: --no-such-flag"):
        comfy_server_factory(extra_args=["--no-such-flag"])


def test_setup_waits_for_the_lock(comfy_install):
    """A second set-up blocks while another process holds the cache lock, then finishes."""
    # The shared cache (0.3.75 and the venv) is the venv's folder; another version sits beside it.
    command = [
        sys.executable,
        "-m",
        "tests.comfy.harness",
        "setup",
        "--cache-dir",
        str(comfy_install.venv_dir.parent),
        "--comfyui",
        comfy_install.version,
    ]
    with exclusive_lock(comfy_install.cache_dir / ".lock"):
        # As .ci/run calls it: a module run from the repository root.
        other = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # Read what the set-up says when it reaches the lock, rather than sleeping a fixed time: on a
        # busy machine Python's start alone can outlast a sleep, and the lock was then free again.
        first = other.stderr.readline()
        assert "waiting for another process" in first, first
        assert other.poll() is None, "set-up ran although the lock was held"
    out, err = other.communicate(timeout=60)
    assert other.returncode == 0, first + err
    assert Path(out.strip()) == comfy_install.comfy_dir


# --- workflow_to_api on hand-made node definitions (no server) ---------------------------------

_FAKE_OBJECT_INFO = {
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "seed": ["INT", {"default": 0, "control_after_generate": True}],
                "steps": ["INT", {"default": 20}],
                "sampler": [["euler", "ddim"]],
            },
            "optional": {
                "noise_seed": ["INT", {"default": 1}],
                "plain_seed": ["INT", {"default": 2}],
                "forced": ["INT", {"forceInput": True}],
                "picked": ["COMBO", {"options": ["a", "b"], "control_after_generate": True}],
                "strength": ["FLOAT", {"default": 0.5}],
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        },
        "input_order": {
            "required": ["model", "seed", "steps", "sampler"],
            "optional": ["noise_seed", "plain_seed", "forced", "picked", "strength"],
        },
        "output": ["LATENT"],
    },
    "Loader": {
        "input": {"required": {"image": [["a.png"], {"image_upload": True}]}},
        "output": ["MODEL", "MASK"],
    },
    "Passthrough": {
        "input": {"required": {"x": ["MODEL"], "scale": ["FLOAT", {"default": 1.0}]}},
        "output": ["MODEL"],
    },
}


def _node(node_id, kind, widgets, inputs=(), mode=0, outputs=()):
    return {
        "id": node_id,
        "type": kind,
        "mode": mode,
        "widgets_values": widgets,
        "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
        "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
    }


def test_widget_values_skip_control_filter_and_upload_slots():
    workflow = {
        "nodes": [
            _node(1, "Loader", ["a.png", "image"], outputs=["MODEL", "MASK"]),
            _node(
                2,
                "Sampler",
                [7, "randomize", 30, "ddim", 8, "fixed", 9, "b", "increment", "", 0.25],
                inputs=[("model", "MODEL", 1), ("forced", "INT", None)],
            ),
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"]],
    }
    assert workflow_to_api(workflow, _FAKE_OBJECT_INFO, strict=True) == {
        "1": {"class_type": "Loader", "inputs": {"image": "a.png"}, "_meta": {"title": "Loader"}},
        "2": {
            "class_type": "Sampler",
            "_meta": {"title": "Sampler"},
            "inputs": {
                "model": ["1", 0],
                "seed": 7,
                "steps": 30,
                "sampler": "ddim",
                "noise_seed": 8,
                "plain_seed": 9,
                "picked": "b",
                "strength": 0.25,
            },
        },
    }


def test_links_through_reroute_primitive_bypass_and_mute():
    workflow = {
        "nodes": [
            _node(1, "Loader", ["a.png", "image"], outputs=["MODEL", "MASK"]),
            _node(2, "Reroute", None, inputs=[("", "*", 1)], outputs=["MODEL"]),
            _node(3, "Passthrough", [2.0], inputs=[("x", "MODEL", 2)], mode=4, outputs=["MODEL"]),
            _node(4, "PrimitiveNode", [42, "fixed"], outputs=["INT"]),
            _node(
                5,
                "Sampler",
                [0, "fixed", 20, "euler", 1, "fixed", 2, "a", "fixed", "", 0.5],
                inputs=[("model", "MODEL", 3), ("seed", "INT", 4), ("strength", "FLOAT", 5)],
            ),
            _node(6, "Passthrough", [3.0], inputs=[("x", "MODEL", None)], mode=2, outputs=["MODEL"]),
            _node(7, "MarkdownNote", ["# hi"]),
        ],
        # Both link layouts the frontend has used: arrays and objects.
        "links": [
            [1, 1, 0, 2, 0, "MODEL"],
            [2, 2, 0, 3, 0, "MODEL"],
            [3, 3, 0, 5, 0, "MODEL"],
            {"id": 4, "origin_id": 4, "origin_slot": 0, "target_id": 5, "target_slot": 1, "type": "INT"},
            [5, 6, 0, 5, 2, "FLOAT"],
        ],
    }
    graph = workflow_to_api(workflow, _FAKE_OBJECT_INFO, strict=True)
    assert set(graph) == {"1", "5"}
    inputs = graph["5"]["inputs"]
    assert inputs["model"] == ["1", 0]  # Reroute followed, bypassed Passthrough wired through
    assert inputs["seed"] == 42  # the PrimitiveNode's value
    assert "strength" not in inputs  # its source is muted, as the frontend leaves it out


def test_widget_count_mismatch_defaults_or_raises():
    short = {"nodes": [_node(1, "Passthrough", [], inputs=[("x", "MODEL", None)])], "links": []}
    assert workflow_to_api(short, _FAKE_OBJECT_INFO)["1"]["inputs"] == {"scale": 1.0}
    long = {"nodes": [_node(1, "Passthrough", [2.0, "status text an extension added"])], "links": []}
    assert workflow_to_api(long, _FAKE_OBJECT_INFO)["1"]["inputs"] == {"scale": 2.0}
    with pytest.raises(Exception, match="widgets_values has 2 entries"):
        workflow_to_api(long, _FAKE_OBJECT_INFO, strict=True)
    unknown = {"nodes": [_node(1, "NoSuchNode", [], outputs=["MODEL"])], "links": []}
    with pytest.raises(Exception, match="NoSuchNode"):
        workflow_to_api(unknown, _FAKE_OBJECT_INFO)
