"""Set-up from the web UI, as a user who never opens a terminal: the no-key notice, the key typed into
Settings → AIThriving, then the free offline mode switched on there and a workflow run against it."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import requests

from support import TEST_KEY
from tests.comfy.harness import execution_error, free_port

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "example_workflows" / "structure_basic.json"
NO_KEY_NOTICE = "API key not set · Settings → AIThriving"
STANDIN_LABEL = "stand-in · free"
MENU_ENTRY = "AIThriving: set API key…"
NO_PROXY = {"http": None, "https": None}
# JavaScript: what web/aithriving_setup.js last heard from the server (its extension's `state`).
SETUP_STATE = "app.extensions.find(e => e.name === 'aithrivingstructure.setup')?.state"


def get(url: str) -> dict:
    response = requests.get(url, timeout=(5, 30), proxies=NO_PROXY)
    response.raise_for_status()
    return response.json()


def wait_for_finished_prompt(url: str, before: set, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        history = get(f"{url}/history")
        finished = [
            v
            for k, v in history.items()
            if k not in before and v.get("status", {}).get("completed") is not None
        ]
        if finished:
            return finished[0]
        assert time.monotonic() < deadline, f"no prompt finished within {timeout:.0f} s of clicking Run"
        time.sleep(0.2)


def test_no_key_notice_then_key_and_offline_mode_from_the_settings(comfy_page_factory, tmp_path):
    key_file = tmp_path / "config" / "aithriving" / "api_key"
    # Nothing listens at the base URL: a run can only succeed through the in-process stand-in.
    env = {
        "AITHRIVING_API_KEY_FILE": str(key_file),
        "AITHRIVING_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "AITHRIVING_CACHE_DIR": str(tmp_path / "cache"),
    }
    ui = comfy_page_factory(env=env)
    server = ui.server  # the ComfyUI comfy_page_factory started for this page
    page = ui.page
    ui.load_workflow(WORKFLOW)

    # No key, offline off: the node and a toast say so, and where to set one.
    ui.wait_for(f"({SETUP_STATE}?.key?.set === false)", message="the key status from the server")
    ui.wait_for(
        f"{json.dumps(NO_KEY_NOTICE)} === app.graph.nodes.find(n => n.type === 'AIThrivingStructure')"
        ".aithrivingNotice()",
        message="the no-key notice on the node",
    )
    assert NO_KEY_NOTICE in ui.structure_node()["badges"]
    # (the toast's markup differs between frontends; its texts do not)
    page.get_by_text("AIThriving Structure: no API key set", exact=True).first.wait_for(state="visible")
    page.get_by_text(
        "Set it in Settings → AIThriving → API key, or switch on the free stand-in there.", exact=True
    ).first.wait_for(state="visible")

    # Settings → AIThriving: the status line, then the key typed and saved.
    ui.evaluate("app.extensionManager.command.execute('Comfy.ShowSettingsDialog')")
    ui.visible_dialog().get_by_text("AIThriving", exact=True).first.click()
    status = page.locator(".aithriving-key-status")
    status.wait_for(state="visible")
    assert status.inner_text().startswith("No API key set.")
    key_input = page.locator(".aithriving-key-input")
    assert key_input.get_attribute("type") == "password"
    # A key pasted with an invisible character: refused, the server's sentence shown, nothing saved.
    key_input.fill(TEST_KEY + "\u200b")
    page.locator(".aithriving-key-save").click()
    refusal = page.locator(".aithriving-key-message")
    page.get_by_text("not plain ASCII text at position").first.wait_for(state="visible")
    assert "U+200B" in refusal.inner_text() and "Saved" not in refusal.inner_text()
    assert status.inner_text().startswith("No API key set.") and not key_file.exists()
    key_input.fill(TEST_KEY)
    page.locator(".aithriving-key-save").click()
    page.get_by_text("Saved. The next run uses it; no restart needed.").wait_for(state="visible")
    assert status.inner_text().startswith("A key is saved in your key file")
    assert key_input.input_value() == ""  # not left in the page
    assert key_file.read_text() == TEST_KEY + "\n"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert get(f"{ui.url}/aithriving/key") == {"set": True, "source": "key file"}
    assert NO_KEY_NOTICE not in ui.structure_node()["badges"]
    page.get_by_text("AIThriving Structure: no API key set", exact=True).first.wait_for(state="hidden")

    # The offline switch: kept by the server next to the key file.
    offline = page.locator('[id="AIThriving.Setup.LocalStandIn"]')
    offline.click()
    ui.wait_for(f"{SETUP_STATE}?.offline === true", message="offline mode on")
    assert get(f"{ui.url}/aithriving/mode") == {"offline": True}
    assert json.loads(key_file.with_name("aithriving-settings.json").read_text()) == {"offline": True}
    ui.close_dialogs()

    node = ui.structure_node()
    assert STANDIN_LABEL in node["badges"] and node["estimate"] == "0 credits · stand-in · free"

    # Run the workflow from the Run button: the in-process stand-in answers, for nothing.
    before = set(get(f"{ui.url}/history"))
    ui.click_run()
    entry = wait_for_finished_prompt(ui.url, before)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    [cost] = [o["aithriving_cost"][0] for o in entry["outputs"].values() if "aithriving_cost" in o]
    assert cost["credits"] == 0 and cost["offline"] is True
    last = ui.wait_for_last_run()
    assert last["text"] == "Last run: 0 credits (stand-in · free)"
    assert "Last run: 0 credits (stand-in · free)" in ui.structure_node()["badges"]

    # The key is nowhere the page or ComfyUI keeps things: settings, workflow, history, browser storage.
    user_dir_texts = [
        p.read_text(errors="replace") for p in (server.base_dir / "user").rglob("*") if p.is_file()
    ]
    storage = ui.evaluate("JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})")
    assert user_dir_texts  # comfy.settings.json at least: the check looked at something
    for text in [*user_dir_texts, storage, json.dumps(entry), ui.log.text(), server.log_text()]:
        assert TEST_KEY not in text
    assert '"offline"' not in json.dumps(entry["prompt"])  # the mode is not part of the workflow


def test_environment_key_wins_and_the_key_dialog_says_so(comfy_page_factory, tmp_path):
    key_file = tmp_path / "config" / "aithriving" / "api_key"
    ui = comfy_page_factory(env={"AITHRIVING_API_KEY": TEST_KEY, "AITHRIVING_API_KEY_FILE": str(key_file)})
    server = ui.server
    page = ui.page
    ui.load_workflow(WORKFLOW)
    ui.wait_for(f"{SETUP_STATE}?.key?.source === 'environment'", message="the key status")
    badges = ui.structure_node()["badges"]
    assert NO_KEY_NOTICE not in badges and STANDIN_LABEL not in badges
    assert page.get_by_text("AIThriving Structure: no API key set", exact=True).count() == 0

    # The node's menu entry opens the key dialog: right-click the node, click the entry (there once).
    ui.frame_graph()
    entry = ui.open_node_menu(ui.structure_node()["id"], MENU_ENTRY)
    assert entry.count() == 1
    entry.first.click()
    dialog = page.locator(".aithriving-key-dialog")
    dialog.wait_for(state="visible")
    assert (
        "set by the AITHRIVING_API_KEY environment variable"
        in dialog.locator(".aithriving-key-status").inner_text()
    )
    assert (
        dialog.locator(".aithriving-key-input").is_disabled()
        and dialog.locator(".aithriving-key-save").is_disabled()
    )
    assert TEST_KEY not in dialog.inner_text() + ui.log.text() + server.log_text()
    assert not key_file.exists()
    # The entry comes through the frontend's getNodeMenuItems hook where it has one; the node's own
    # getExtraMenuOptions is extended only on frontends without it (1.25).
    hooks = ui.evaluate("""(() => { const node = app.graph.nodes.find(n => n.type === 'AIThrivingStructure');
        const options = []; node.getExtraMenuOptions?.(app.canvas, options);
        return {hook: typeof app.collectNodeMenuItems === 'function',
                collected: app.collectNodeMenuItems?.(node)?.map(o => o?.content) ?? null,
                legacy: options.map(o => o?.content)}; })()""")
    if hooks["hook"]:
        assert hooks["collected"].count(MENU_ENTRY) == 1 and MENU_ENTRY not in hooks["legacy"]
    else:
        assert hooks["legacy"].count(MENU_ENTRY) == 1
    assert not [line for line in ui.log.console if line.startswith("[warning] [deprecated-by-pack]")]
