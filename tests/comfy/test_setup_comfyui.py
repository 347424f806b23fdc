"""Set-up from ComfyUI itself, in a real ComfyUI 0.3.75: key status and entry, the free offline mode,
queue-time errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from structure_api.standin import StandInServer
from support import TEST_KEY
from tests.comfy.harness import ComfyServer, PromptRejected, execution_error, free_port, saved_images
from tests.comfy.install import PACK_LINK_NAME

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "example_workflows" / "structure_example.png"
NODE = "AIThrivingStructure"
JSON = {"Content-Type": "application/json"}


def graph(
    prompt: object = "a watercolor cottage", seed: int = 1234, prefix: str = "setup", **node_inputs
) -> dict:
    inputs = {
        "image": ["1", 0],
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
        "3": {"class_type": NODE, "inputs": inputs},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def cost_of(entry: dict) -> dict:
    return entry["outputs"]["3"]["aithriving_cost"][0]


def start(comfy_install, base_dir: Path, env: dict) -> ComfyServer:
    server = ComfyServer(comfy_install, env=env, base_dir=base_dir).start()
    server.upload_image(EXAMPLE, "structure_example.png")
    return server


def everything_served_and_logged(server: ComfyServer, answers: list[str]) -> str:
    """Every answer body seen, the log, history and queue, and every file under user/: where a key must not
    be."""
    texts = [*answers, server.log_text(), json.dumps(server.history()), json.dumps(server.queue())]
    for path in (server.base_dir / "user").rglob("*"):
        if path.is_file():
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


@pytest.fixture(scope="module")
def billing_standin():
    # Plays the paid service (no free mark): it checks the key and would charge 6 credits per image.
    with StandInServer(api_key=TEST_KEY) as server:
        yield server


@pytest.fixture
def key_file(tmp_path) -> Path:
    # Outside the base directory, in a folder that does not exist yet: the pack creates it 0700.
    return tmp_path / "config" / "aithriving" / "api_key"


def test_key_status_set_from_the_ui_used_without_restart_then_deleted(
    comfy_install, billing_standin, tmp_path, key_file
):
    server = start(
        comfy_install,
        tmp_path / "base",
        {
            "AITHRIVING_BASE_URL": billing_standin.url,
            "AITHRIVING_API_KEY_FILE": str(key_file),
            "AITHRIVING_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    answers: list[str] = []

    def call(method: str, path: str, **kwargs):
        response = server.request(method, path, **kwargs)
        answers.append(response.text)
        return response

    try:
        assert call("GET", "/aithriving/key").json() == {"set": False, "source": None}
        assert call("GET", "/api/aithriving/key").json() == {"set": False, "source": None}

        entry = server.run(graph(prefix="nokey"))
        assert (
            "No API key found: set it in Settings > AIThriving" in execution_error(entry)["exception_message"]
        )
        # In the language the user chose in ComfyUI's settings (locales/es/main.json).
        assert call("POST", "/settings/Comfy.Locale", json="es").status_code == 200
        entry = server.run(graph(prefix="nokey-es"))
        assert execution_error(entry)["exception_message"].startswith(
            "No hay clave de API: introdúzcala en Configuración > AIThriving > Clave de API"
        )
        assert call("POST", "/settings/Comfy.Locale", json="en").status_code == 200
        assert billing_standin.requests == []

        # Refusals: nothing is written, and the key is never echoed.
        for bad, words in (
            ("", "blank"),
            ("   ", "blank"),
            ("sk-abc\ndef", "control character"),
            ("sk-\x07bell", "control character"),
        ):
            response = call("POST", "/aithriving/key", json={"key": bad})
            assert response.status_code == 400 and words in response.json()["error"], response.text
        assert call("POST", "/aithriving/key", json={"token": TEST_KEY}).status_code == 400
        assert (
            call(
                "POST",
                "/aithriving/key",
                data=json.dumps({"key": TEST_KEY}),
                headers={"Content-Type": "text/plain"},
            ).status_code
            == 415
        )
        assert not key_file.parent.exists()

        # Another web page: ComfyUI's own check (loopback Host) and the pack's (any Host, Sec-Fetch-Site).
        evil = {"Origin": "http://evil.example"}
        assert call("POST", "/aithriving/key", json={"key": TEST_KEY}, headers=evil).status_code == 403
        lan = {"Origin": "http://evil.example", "Host": "comfy.lan:8188"}
        response = call("POST", "/aithriving/key", json={"key": TEST_KEY}, headers=lan)
        assert response.status_code == 403 and "another web page" in response.json()["error"]
        assert call("DELETE", "/aithriving/key", headers=lan).status_code == 403
        assert call("POST", "/aithriving/mode", json={"offline": True}, headers=lan).status_code == 403
        assert (
            call(
                "POST", "/aithriving/key", json={"key": TEST_KEY}, headers={"Sec-Fetch-Site": "cross-site"}
            ).status_code
            == 403
        )
        assert not key_file.parent.exists()
        assert call("GET", "/aithriving/mode").json() == {"offline": False}

        # The UI's own request: same origin.
        same = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
        response = call("POST", "/aithriving/key", json={"key": f"  {TEST_KEY}  "}, headers=same)
        assert response.status_code == 200 and response.json() == {"set": True, "source": "key file"}
        assert key_file.read_text() == TEST_KEY + "\n"
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(key_file.parent).st_mode) == 0o700
        assert call("GET", "/aithriving/key").json() == {"set": True, "source": "key file"}

        # The next run uses it, no restart; the billing stand-in charges 6 credits and the node says so.
        entry = server.run(graph(prefix="withkey"))
        assert execution_error(entry) is None, execution_error(entry)
        assert [r.headers["authorization"] for r in billing_standin.requests] == [TEST_KEY]
        assert cost_of(entry)["credits"] == 6 and cost_of(entry)["offline"] is False

        # A refused key leaves the saved one alone.
        assert call("POST", "/aithriving/key", json={"key": "\x00"}).status_code == 400
        assert key_file.read_text() == TEST_KEY + "\n"

        response = call("DELETE", "/aithriving/key", headers=same)
        assert response.status_code == 200 and response.json() == {"set": False, "source": None}
        assert not key_file.exists()
        entry = server.run(graph(prefix="deleted", seed=99))
        assert "No API key found" in execution_error(entry)["exception_message"]

        assert TEST_KEY not in everything_served_and_logged(server, answers)
        assert not any(
            TEST_KEY in p.read_text(errors="replace")
            for p in (server.base_dir / "user").rglob("*")
            if p.is_file()
        )
    finally:
        server.stop()


def test_environment_key_wins_and_the_routes_say_so(comfy_install, tmp_path, key_file):
    server = start(
        comfy_install,
        tmp_path / "base",
        {"AITHRIVING_API_KEY": TEST_KEY, "AITHRIVING_API_KEY_FILE": str(key_file)},
    )
    try:
        assert server.request("GET", "/aithriving/key").json() == {"set": True, "source": "environment"}
        response = server.request("POST", "/aithriving/key", json={"key": "another-key"})
        assert response.status_code == 409
        assert "AITHRIVING_API_KEY environment variable is set" in response.json()["error"]
        assert server.request("DELETE", "/aithriving/key").status_code == 409
        assert not key_file.parent.exists()
        assert TEST_KEY not in response.text + server.log_text()
    finally:
        server.stop()


def test_key_file_under_comfyuis_user_folder_is_refused(comfy_install, tmp_path):
    base = tmp_path / "base"
    inside = base / "user" / "default" / "aithriving_key"
    server = start(comfy_install, base, {"AITHRIVING_API_KEY_FILE": str(inside)})
    try:
        response = server.request("POST", "/aithriving/key", json={"key": TEST_KEY})
        assert response.status_code == 409 and "serves over HTTP" in response.json()["error"]
        assert not inside.exists()
    finally:
        server.stop()


def test_key_routes_refuse_rebound_hosts_unusable_keys_and_every_served_folder(comfy_install, tmp_path):
    # The config folder is a link to a shared folder (mode 2775): saving must not change the target's mode.
    shared = tmp_path / "shared-config"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    linked = tmp_path / "home" / "aithriving"
    linked.parent.mkdir()
    linked.symlink_to(shared, target_is_directory=True)
    key_file = linked / "api_key"
    base = tmp_path / "base"
    server = start(comfy_install, base, {"AITHRIVING_API_KEY_FILE": str(key_file)})
    try:
        response = server.request("POST", "/aithriving/key", json={"key": TEST_KEY})
        assert response.status_code == 200 and response.json() == {"set": True, "source": "key file"}
        assert stat.S_IMODE(os.stat(shared).st_mode) == 0o2775 and linked.is_symlink()
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600

        # DNS rebinding: a page's own name resolving to this machine; Host and Origin agree, both foreign.
        port = server.port
        for name in ("evil.example", "localhost.evil.example", "127.0.0.1.nip.io"):
            rebound = {"Host": f"{name}:{port}", "Origin": f"http://{name}:{port}"}
            for method, path, body in (
                ("POST", "/aithriving/key", {"key": "attacker-key"}),
                ("DELETE", "/aithriving/key", None),
                ("POST", "/aithriving/mode", {"offline": True}),
            ):
                response = server.request(method, path, json=body, headers=rebound)
                assert response.status_code == 403, (name, method, path, response.text)
                assert "another host name" in response.json()["error"]
        assert key_file.read_text() == TEST_KEY + "\n"
        assert server.request("GET", "/aithriving/mode").json() == {"offline": False}
        # This machine's own names still work, from the page (Origin) or a script (none).
        for host in ("localhost", "127.0.0.1", "[::1]"):
            own = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
            response = server.request("POST", "/aithriving/mode", json={"offline": False}, headers=own)
            assert response.status_code == 200, (host, response.text)

        # Unusable keys: 400 with one sentence, and the working key stays.
        for bad, words in (
            ("sk-live\u200bkey", "U+200B"),
            ("\ufeffsk-live-key", "U+FEFF"),
            ("sk-live\u00a0key", "U+00A0"),
            ("sk-livé-key", "U+00E9"),
        ):
            response = server.request("POST", "/aithriving/key", json={"key": bad})
            error = response.json()["error"]
            assert response.status_code == 400 and words in error, response.text
            assert "not plain ASCII" in error
            assert "sk-live" not in error and "\n" not in error
            assert key_file.read_text() == TEST_KEY + "\n"
            assert server.request("GET", "/aithriving/key").json() == {"set": True, "source": "key file"}
    finally:
        server.stop()

    # Every folder ComfyUI serves: input (/view?type=input), output, temp, user/, the custom nodes' web.
    # One server: its key file's folder is a link re-pointed at each served folder in turn (the check
    # resolves links, so this is the same as naming the folder itself).
    switch = tmp_path / "switch"
    server = start(
        comfy_install,
        base,
        {
            "AITHRIVING_API_KEY_FILE": str(switch / "aithriving_key"),
            "AITHRIVING_ALLOWED_HOSTS": " studio.example ,Comfy.Example.org:443",
        },
    )
    try:
        # Names the user listed (a reverse proxy's, a LAN name) pass the host check (then this unusable
        # key gets its 400, which writes nothing); any other name is still refused.
        port = server.port
        for name, status in (("studio.example", 400), ("comfy.example.org", 400), ("evil.example", 403)):
            named = {"Host": f"{name}:{port}", "Origin": f"http://{name}:{port}"}
            response = server.request("POST", "/aithriving/key", json={"key": "k\u200b"}, headers=named)
            assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert "evil.example" in error and "AITHRIVING_ALLOWED_HOSTS" in error, error
        pack_web = base / "custom_nodes" / PACK_LINK_NAME / "web"  # this pack's own web folder, linked in
        assert pack_web.resolve() == REPO / "web"
        for folder in (base / "input", base / "output", base / "temp", base / "user" / "default", pack_web):
            folder.mkdir(parents=True, exist_ok=True)
            switch.unlink(missing_ok=True)
            switch.symlink_to(folder, target_is_directory=True)
            response = server.request("POST", "/aithriving/key", json={"key": TEST_KEY})
            assert response.status_code == 409, (folder, response.text)
            assert "serves over HTTP" in response.json()["error"]
            assert not (folder / "aithriving_key").exists()
        assert server.request("GET", "/view?filename=aithriving_key&type=input").status_code == 404
    finally:
        server.stop()
        (REPO / "web" / "aithriving_key").unlink(missing_ok=True)  # never left in the repository


def test_offline_mode_runs_with_no_key_and_no_server_for_free_and_survives_a_restart(
    comfy_install, tmp_path, key_file
):
    closed_port = free_port()  # nothing listens here: the paid path could not work
    env = {
        "AITHRIVING_BASE_URL": f"http://127.0.0.1:{closed_port}",
        "AITHRIVING_API_KEY_FILE": str(key_file),
        "AITHRIVING_CACHE_DIR": str(tmp_path / "cache"),
    }
    base = tmp_path / "base"
    server = start(comfy_install, base, env)
    try:
        assert server.request("GET", "/aithriving/mode").json() == {"offline": False}
        entry = server.run(graph(prefix="offline-off"))
        assert "No API key found" in execution_error(entry)["exception_message"]

        for bad in ({"offline": "yes"}, {"offline": 1}, {"local": "yes"}, {}):  # "local": the old spelling
            assert server.request("POST", "/aithriving/mode", json=bad).status_code == 400
        response = server.request("POST", "/aithriving/mode", json={"offline": True})
        assert response.status_code == 200 and response.json() == {"offline": True}
        settings_file = key_file.with_name("aithriving-settings.json")
        assert json.loads(settings_file.read_text()) == {"offline": True}

        entry = server.run(graph(prefix="offline-on"))
        assert execution_error(entry) is None, execution_error(entry)
        cost = cost_of(entry)
        assert (
            cost["credits"] == 0
            and cost["offline"] is True
            and cost["free"] is True
            and cost["credits_per_image"] == 0
        )
        [image] = saved_images(entry)
        png = Image.open(base / "output" / image["subfolder"] / image["filename"])
        assert png.size == Image.open(EXAMPLE).size
        # The mode is the machine's, not the workflow's: nothing of it in the saved PNG's metadata.
        metadata = json.dumps(png.text)
        assert (
            "aithriving-settings" not in metadata
            and '"offline"' not in metadata
            and "stand-in" not in metadata
        )
        assert "stand-in" not in json.dumps(entry["prompt"])
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.png"))
        assert not key_file.exists()
    finally:
        server.stop()

    restarted = start(comfy_install, base, env)
    try:
        assert restarted.request("GET", "/aithriving/mode").json() == {"offline": True}
        entry = restarted.run(graph(prefix="offline-again", seed=77))
        assert execution_error(entry) is None and cost_of(entry)["credits"] == 0
        # {"local": bool} is the old spelling of the field, still accepted.
        assert restarted.request("POST", "/aithriving/mode", json={"offline": False}).json() == {
            "offline": False
        }
        entry = restarted.run(graph(prefix="offline-off-again", seed=78))
        assert "No API key found" in execution_error(entry)["exception_message"]
    finally:
        restarted.stop()


def test_switching_offline_mode_off_runs_a_fixed_seed_again_against_the_service(
    comfy_install, billing_standin, tmp_path, key_file
):
    # The same fixed-seed graph, queued with the stand-in on and then off: ComfyUI must not reuse the
    # stand-in's drawing as if it were the service's result (the node's fingerprint names where requests go).
    server = start(
        comfy_install,
        tmp_path / "base",
        {
            "AITHRIVING_BASE_URL": billing_standin.url,
            "AITHRIVING_API_KEY": TEST_KEY,
            "AITHRIVING_API_KEY_FILE": str(key_file),
            "AITHRIVING_CACHE_DIR": "off",
        },
    )
    try:
        sent_before = len(billing_standin.requests)
        assert server.request("POST", "/aithriving/mode", json={"offline": True}).json() == {"offline": True}
        entry = server.run(graph(prefix="fixed", seed=4242))
        assert execution_error(entry) is None and cost_of(entry)["offline"] is True
        assert len(billing_standin.requests) == sent_before

        assert server.request("POST", "/aithriving/mode", json={"offline": False}).json() == {
            "offline": False
        }
        entry = server.run(graph(prefix="fixed", seed=4242))
        assert execution_error(entry) is None, execution_error(entry)
        assert len(billing_standin.requests) == sent_before + 1, "the service received nothing"
        assert billing_standin.requests[-1].fields["seed"] == "4242"
        cost = cost_of(entry)
        assert (cost["offline"], cost["credits"], cost["free"]) == (False, 6, False)
        # The fingerprint is kept in the prompt, and so in the PNG: it names neither the mode nor the address.
        [image] = saved_images(entry)
        metadata = json.dumps(Image.open(server.output_dir / image["subfolder"] / image["filename"]).text)
        assert billing_standin.url not in metadata and "stand-in" not in metadata

        # Unchanged since: a fixed seed's output is reused as before, nothing more is sent.
        server.run(graph(prefix="fixed", seed=4242))
        assert len(billing_standin.requests) == sent_before + 1
    finally:
        server.stop()


def test_a_serve_standin_at_the_base_url_is_reported_free(comfy_install, tmp_path):
    # `structure-api serve` (free=True) with the two variables its banner shows: 0 credits on every figure.
    with StandInServer(free=True) as serve:
        server = start(
            comfy_install,
            tmp_path / "base",
            {
                "AITHRIVING_BASE_URL": serve.url,
                "AITHRIVING_API_KEY": "stand-in",
                "AITHRIVING_CACHE_DIR": "off",
            },
        )
        try:
            entry = server.run(graph(prefix="serve"))
            assert execution_error(entry) is None, execution_error(entry)
            cost = cost_of(entry)
            assert (cost["credits"], cost["credits_per_image"], cost["free"], cost["offline"]) == (
                0,
                0,
                True,
                False,
            )
            assert len(serve.requests) == 1
        finally:
            server.stop()


@pytest.fixture(scope="module")
def queue_server(comfy_install, billing_standin, tmp_path_factory):
    server = start(
        comfy_install,
        tmp_path_factory.mktemp("queue-base"),
        {
            "AITHRIVING_BASE_URL": billing_standin.url,
            "AITHRIVING_API_KEY": TEST_KEY,
            "AITHRIVING_CACHE_DIR": "off",
        },
    )
    yield server
    server.stop()


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("", "prompt is empty"),
        ("   \n ", "prompt is empty"),
        ("x" * 10001, "10001 characters long"),
        ("a cottage\x07", "control character U+0007"),
    ],
)
def test_bad_prompt_is_refused_when_queued_with_nothing_sent(queue_server, billing_standin, prompt, words):
    billing_standin.clear()
    before = set(queue_server.history())
    with pytest.raises(PromptRejected) as caught:
        queue_server.queue_prompt(graph(prompt=prompt))
    errors = caught.value.node_errors["3"]["errors"]
    assert len(errors) == 1 and words in errors[0]["details"], errors
    assert errors[0]["extra_info"]["input_name"] == "prompt"
    assert billing_standin.requests == []
    assert set(queue_server.history()) == before  # nothing ran, not even the image loader


@pytest.mark.parametrize(
    "name, value", [("control_strength", 1.5), ("control_strength", -0.1), ("seed", 4294967295), ("seed", -1)]
)
def test_out_of_range_parameters_are_refused_when_queued(queue_server, billing_standin, name, value):
    # ComfyUI checks the schema's min/max itself (validate_inputs names only the prompt, so it still does).
    billing_standin.clear()
    with pytest.raises(PromptRejected) as caught:
        queue_server.queue_prompt(graph(**{name: value}))
    errors = caught.value.node_errors["3"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == [name]
    assert billing_standin.requests == []


def test_a_choice_not_offered_is_refused_before_anything_is_sent(queue_server, billing_standin):
    billing_standin.clear()
    if queue_server.install.version in ("0.3.52", "0.3.75"):
        # These do not check a V3 combo's options at /prompt; the node refuses it when it runs.
        entry = queue_server.run(graph(output_format="gif"))
        message = execution_error(entry)["exception_message"]
        assert "output_format must be one of png, jpeg, webp; got 'gif'" in message
    else:
        # ComfyUI 0.33.0 checks them when the prompt is queued.
        with pytest.raises(PromptRejected) as caught:
            queue_server.queue_prompt(graph(output_format="gif"))
        assert "output_format: 'gif' not in ['png', 'jpeg', 'webp']" in str(caught.value)
    assert billing_standin.requests == []


def test_a_linked_prompt_is_checked_when_the_node_runs(queue_server, billing_standin):
    billing_standin.clear()
    api = graph(prompt=["5", 0])
    api["5"] = {"class_type": "PrimitiveString", "inputs": {"value": "   "}}
    entry = queue_server.run(api)
    assert "prompt is empty" in execution_error(entry)["exception_message"]
    assert billing_standin.requests == []


def test_the_templates_picture_never_replaces_a_users_own(comfy_install, tmp_path):
    # A picture of the user's own under the same name in ComfyUI's input folder stays as it is.
    base = tmp_path / "base"
    (base / "input").mkdir(parents=True)
    Image.new("RGB", (80, 80), (200, 10, 10)).save(base / "input" / EXAMPLE.name)
    before = (base / "input" / EXAMPLE.name).read_bytes()
    assert before != EXAMPLE.read_bytes()
    server = ComfyServer(comfy_install, base_dir=base).start()
    try:
        assert server.custom_node_import_status() == "loaded"
        assert (server.input_dir / EXAMPLE.name).read_bytes() == before
        assert [
            path.name for path in server.input_dir.iterdir() if path.name.startswith(".")
        ] == []  # no temp file
    finally:
        server.stop()
