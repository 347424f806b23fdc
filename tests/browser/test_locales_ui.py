"""A French or a Spanish user meets none of the pack's English: node, badges, toast, settings panel, key
form, node menu, key dialog, offline mode and a run, each read back from the page as the user sees it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from structure_api.settings import MAX_KEY_CHARS
from tests.comfy.harness import free_port
from tests.test_web_translations import messages

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "example_workflows" / "structure_basic.json"
NODE = "AIThrivingStructure"
SETUP_STATE = "app.extensions.find(e => e.name === 'aithrivingstructure.setup')?.state"
# The frontend's vue-i18n instance (what it translates its panels with).
FRONTEND_I18N = (
    "(() => { const a = document.getElementById('vue-app')?.__vue_app__;"
    " return a?._context?.provides?.[a.__VUE_I18N_SYMBOL__]?.global; })()"
)
STRUCTURE = f"app.graph.nodes.find(n => (n.comfyClass ?? n.type) === {json.dumps(NODE)})"


def node_defs(language: str) -> dict:
    return json.loads((REPO / "locales" / language / "nodeDefs.json").read_text(encoding="utf-8"))[NODE]


def english_pieces(language: str) -> list[str]:
    """Every English text of the pack that this language says otherwise, cut at its {placeholders}.

    Pieces shorter than 6 characters ("≈ ", " (") say nothing about the language and are left out.
    """
    english, theirs = messages("en"), messages(language)
    texts = [text for key, text in english.items() if theirs[key] != text]
    english_node, their_node = node_defs("en"), node_defs(language)
    texts += [
        english_node[field]
        for field in ("display_name", "description")
        if their_node[field] != english_node[field]
    ]
    pieces = {piece for text in texts for piece in re.split(r"\{\w+\}", text)}
    return sorted(piece for piece in pieces if len(piece.strip()) >= 6)


def mine(language: str, key: str, **values) -> str:
    """This pack's text in a language, placeholders filled."""
    text = messages(language)[f"aithrivingStructure.{key}"]
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), text)


@pytest.mark.parametrize("language", ["fr", "es"])
def test_no_english_of_ours_in_the_ui(comfy_page_factory, tmp_path, language):
    key_file = tmp_path / "config" / "aithriving" / "api_key"
    env = {
        "AITHRIVING_API_KEY_FILE": str(key_file),
        "AITHRIVING_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "AITHRIVING_CACHE_DIR": str(tmp_path / "cache"),
    }
    ui = comfy_page_factory(env=env, settings={"Comfy.Locale": language})
    page = ui.page
    seen: list[str] = []  # every text read off the page, checked at the end

    def read(text: str) -> str:
        seen.append(text)
        return text

    ui.load_workflow(WORKFLOW)
    ui.wait_for(f"({SETUP_STATE}?.key?.set === false)", message="the key status from the server")
    notice = mine(language, "noticeNoKey")
    ui.wait_for(
        f"{STRUCTURE}.aithrivingNotice() === {json.dumps(notice)}", message="the translated no-key notice"
    )
    node = ui.structure_node()
    assert read(node["title"]) == node_defs(language)["display_name"]
    badges = [read(text) for text in node["badges"]]
    assert mine(language, "estimate", credits=6) in badges and notice in badges

    # The start-up toast.
    page.get_by_text(mine(language, "toastNoKeySummary"), exact=True).first.wait_for(state="visible")
    page.get_by_text(mine(language, "toastNoKeyDetail"), exact=True).first.wait_for(state="visible")
    read(page.locator("body").inner_text())

    # Settings → AIThriving: the frontend names the settings and the group from settings.json and main.json;
    # the key form is ours.
    ui.evaluate("app.extensionManager.command.execute('Comfy.ShowSettingsDialog')")
    ui.visible_dialog().get_by_text("AIThriving", exact=True).first.click()
    status = page.locator(".aithriving-key-status")
    status.wait_for(state="visible")
    assert read(status.inner_text()) == mine(language, "keyStatusNone")
    their_settings = messages(language)
    for setting in ("AIThriving_Setup_APIKey", "AIThriving_Setup_LocalStandIn"):
        name = their_settings[f"settings.{setting}.name"]
        ui.visible_dialog().get_by_text(name, exact=True).first.wait_for(state="visible")
    ui.visible_dialog().get_by_text(their_settings["settingsCategories.Setup"], exact=True).first.wait_for(
        state="visible"
    )
    key_input = page.locator(".aithriving-key-input")
    assert read(key_input.get_attribute("placeholder")) == mine(language, "keyPlaceholder")
    assert read(key_input.get_attribute("aria-label")) == mine(language, "keyInputLabel")
    page.locator(".aithriving-key-save").click()  # nothing typed: said in the user's language, nothing sent
    page.get_by_text(mine(language, "keyEmpty"), exact=True).wait_for(state="visible")
    # A refusal by the server (it words it in English) is said in the user's language.
    key_input.fill("k" * (MAX_KEY_CHARS + 1))
    page.locator(".aithriving-key-save").click()
    page.get_by_text(mine(language, "keyRefused"), exact=True).wait_for(state="visible")
    assert not key_file.exists()
    # The tooltips, as the frontend's own translation function gives them to the panel on hover.
    for setting in ("AIThriving_Setup_APIKey", "AIThriving_Setup_LocalStandIn"):
        tooltip = ui.evaluate(f"{FRONTEND_I18N}?.t({json.dumps(f'settings.{setting}.tooltip')}) ?? null")
        assert read(tooltip) == their_settings[f"settings.{setting}.tooltip"]
    read(ui.visible_dialog().first.inner_text())

    # The offline switch, then a run against the in-process stand-in.
    page.locator('[id="AIThriving.Setup.LocalStandIn"]').click()
    ui.wait_for(f"{SETUP_STATE}?.offline === true", message="offline mode on")
    ui.close_dialogs()
    node = ui.structure_node()
    badges = [read(text) for text in node["badges"]]
    assert mine(language, "estimateStandIn") in badges and mine(language, "noticeStandIn") in badges
    page.get_by_text(mine(language, "toastNoKeySummary"), exact=True).first.wait_for(state="hidden")
    ui.evaluate("app.queuePrompt(0, 1)")
    last = ui.wait_for_last_run(timeout=60)
    assert read(last["text"]) == mine(language, "lastRunStandIn")

    # The node's menu entry, then the key dialog it opens.
    ui.frame_graph()
    entry = ui.open_node_menu(node["id"], mine(language, "menuSetKey"))
    read(page.locator("body").inner_text())
    entry.first.click()
    dialog = page.locator(".aithriving-key-dialog")
    dialog.wait_for(state="visible")
    read(ui.visible_dialog().first.inner_text())
    assert mine(language, "dialogTitle") in seen[-1] and mine(language, "dialogOffline") in seen[-1]
    ui.close_dialogs()

    # None of it is English.
    pieces = english_pieces(language)
    assert len(pieces) > 30  # the check compares against every text of the pack
    page_text = "\n".join(seen)
    english = [piece for piece in pieces if piece in page_text]
    assert not english, f"English on the {language} page: {english}\n--- what the page showed:\n{page_text}"
