"""Secrets in a real ComfyUI 0.3.75: the node runs with the canary key; the key must show up nowhere.

Uses the harness of tests/comfy (ComfyUI is fetched into .cache/comfyui on first use). Three
prompts run: a success, a 401 whose body echoes the key, and a code -1 answer echoing it. Then
the key is searched for in the saved PNGs (every byte, text chunks decoded), /history, /queue,
/internal/logs, the ComfyUI log file, every file under ComfyUI's base directory (user/, output/,
temp/, input/, ...) and the result store.
"""

from __future__ import annotations

import json

import pytest
import requests

from structure_api.standin import Respond, StandInServer

from .probes import CANARY_KEY, count_files, files_with_key, image_file_bytes, key_found_in, photo_like

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(900)]  # the first run may build ComfyUI's venv

NODE = "AIThrivingStructure"


def _graph(seed: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "canary-input.png"}},
        "2": {
            "class_type": NODE,
            "inputs": {
                "image": ["1", 0],
                "prompt": "a lighthouse, watercolour",
                "control_strength": 0.7,
                "seed": seed,
                "output_format": "png",
                "outside_limits": "fit and restore size",
                "negative_prompt": "blur",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


# A UI-format workflow, as the frontend would attach it (SaveImage embeds it in the PNG).
_WORKFLOW = {
    "last_node_id": 3,
    "nodes": [
        {
            "id": 2,
            "type": NODE,
            "widgets_values": [
                "a lighthouse, watercolour",
                0.7,
                11,
                "fixed",
                "png",
                "fit and restore size",
                "blur",
            ],
        }
    ],
    "links": [],
    "version": 0.4,
}


def test_comfyui_history_queue_logs_files_and_png_hold_no_key(tmp_path_factory, ledger):
    from tests.comfy.harness import ComfyServer, ensure_comfyui, execution_error, saved_images

    install = ensure_comfyui()
    cache_dir = tmp_path_factory.mktemp("canary-cache")
    base_dir = tmp_path_factory.mktemp("canary-comfy-base")
    with StandInServer(api_key=CANARY_KEY) as service:
        server = ComfyServer(
            install,
            base_dir=base_dir,
            env={
                "AITHRIVING_API_KEY": CANARY_KEY,
                "AITHRIVING_BASE_URL": service.url,
                "AITHRIVING_CACHE_DIR": str(cache_dir),
            },
        )
        with server:
            assert server.custom_node_import_status() == "loaded", server.log_text()[-3000:]
            server.upload_image(image_file_bytes(photo_like(96, 80)), "canary-input.png")
            ok = server.run(_graph(11, "canary/ok"), timeout=120, workflow=_WORKFLOW)
            service.script(Respond(401, body={"code": -1, "message": f"Invalid API key {CANARY_KEY}"}))
            unauthorized = server.run(_graph(12, "canary/401"), timeout=120, workflow=_WORKFLOW)
            service.script(Respond(200, body={"code": -1, "message": f"failed for {CANARY_KEY}"}))
            failed = server.run(_graph(13, "canary/failed"), timeout=120, workflow=_WORKFLOW)

            assert ok["status"]["status_str"] == "success", execution_error(ok)
            assert (
                unauthorized["status"]["status_str"] == "error" and failed["status"]["status_str"] == "error"
            )
            pngs = {
                image["filename"]: server.view(image["filename"], image["subfolder"], image["type"])
                for image in saved_images(ok)
            }
            history = json.dumps(server.history())
            queue = json.dumps(server.queue())
            internal_logs = requests.get(f"{server.url}/internal/logs", timeout=(5, 30)).text
            errors = [execution_error(unauthorized), execution_error(failed)]
        log_text = server.log_text()
        recorded = service.requests

    places = {
        "saved PNG (all bytes, text chunks decoded)": b"".join(pngs.values()),
        "/history (all prompts, outputs, status messages, error tracebacks)": history,
        "/queue": queue,
        "/internal/logs": internal_logs,
        "ComfyUI log file": log_text,
        "execution errors shown in the UI": json.dumps(errors),
    }
    leaks = [place for place, content in places.items() if key_found_in(content)]
    leaked_files = files_with_key(base_dir) + files_with_key(cache_dir)
    other_fields = [
        r
        for r in recorded
        if key_found_in(
            repr(r.fields) + r.path + repr({k: v for k, v in r.headers.items() if k != "authorization"})
        )
        or key_found_in(r.image_bytes or b"")
    ]
    searched = len(places) + count_files(base_dir) + count_files(cache_dir) + len(recorded)

    ledger.count("key_places_checked", searched)
    ledger.count("keys_leaked", len(leaks) + len(leaked_files) + len(other_fields))
    ledger.row(
        "secrets",
        "real ComfyUI 0.3.75: LoadImage -> Structure -> SaveImage, a success and two failures "
        "whose answers echo the key",
        "key in none of: saved PNG, workflow/prompt in it, /history, /queue, /internal/logs, log file, "
        "files under ComfyUI's base directory, result store; only in the authorization header",
        f"{searched} places searched ({count_files(base_dir)} files under the base directory, "
        f"{count_files(cache_dir)} in the cache, {len(recorded)} recorded requests); key found in "
        f"{len(leaks) + len(leaked_files) + len(other_fields)}",
        requests=len(recorded),
    )

    assert pngs and all(b"tEXt" in data or b"iTXt" in data for data in pngs.values()), "workflow not embedded"
    assert "lighthouse" in history and "Invalid API key" in history  # the searched texts are the real ones
    assert leaks == [], leaks
    assert leaked_files == [], [str(p) for p in leaked_files]
    assert other_fields == []
    assert len(recorded) == 3 and all(r.headers["authorization"] == CANARY_KEY for r in recorded)
    assert count_files(cache_dir) >= 2
