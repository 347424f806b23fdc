"""The pack in ComfyUI's real web UI, in headless Chromium (Playwright), on every entry of the matrix.

A user's path: open the template browser, pick one of the pack's workflows (or drop the workflow file
on the canvas), look at the node, press Run, see the image and the cost on the node; open the node's
help; switch the language; the same in the "Nodes 2.0" rendering. Runs against the stand-in;
nothing is paid. Each test id names the ComfyUI and the frontend, e.g. [comfyui-0.3.75+frontend-1.58.1].
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from structure_api.standin import StandInServer
from tests.browser.comfy_page import NODE, PACK, PACK_URL_PART, ComfyPage, save_small_png, save_thumbnail
from tests.browser.conftest import REPO, VIEWPORT, set_setting
from tests.comfy.harness import ComfyServer, execution_error

WORKFLOW_DIR = REPO / "example_workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
CREDITS_PER_IMAGE = 6
WIDGETS = [
    "prompt",
    "control_strength",
    "seed",
    "control_after_generate",
    "output_format",
    "outside_limits",
    "negative_prompt",
]
RUN_TIMEOUT = 60.0


# -- helpers --------------------------------------------------------------------------------------


def http_get(server: ComfyServer, path: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", timeout=(5, 60), proxies={"http": None, "https": None})


def workflow_json(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def batch_size(workflow: dict) -> int:
    """Images reaching the Structure node: the RepeatImageBatch amount if the workflow has one, else 1."""
    repeat = [n for n in workflow["nodes"] if n["type"] == "RepeatImageBatch"]
    return repeat[0]["widgets_values"][0] if repeat else 1


def structure_widgets(workflow: dict) -> list:
    return next(n for n in workflow["nodes"] if n["type"] == NODE)["widgets_values"]


def node_inputs(info: dict) -> dict:
    """name -> options of a node's required and optional inputs, from /object_info."""
    return {
        name: spec[1]
        for group in ("required", "optional")
        for name, spec in (info["input"].get(group) or {}).items()
    }


def free_execution_cache(server: ComfyServer) -> None:
    """What "Unload Models and Execution Cache" does: ComfyUI forgets its cached node outputs."""
    response = requests.post(
        f"{server.url}/free",
        json={"unload_models": True, "free_memory": True},
        timeout=(5, 30),
        proxies={"http": None, "https": None},
    )
    response.raise_for_status()
    time.sleep(1.0)  # the prompt worker drops its caches when it next wakes, at once when idle


def run_from_ui(ui: ComfyPage, server: ComfyServer) -> dict:
    """Click Run; wait for the prompt it queued (from this page) to finish; its history entry."""
    before = set(server.history())
    runs_before = ui.structure_runs()
    ui.click_run()
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        new = {k: v for k, v in server.history().items() if k not in before}
        finished = [v for v in new.values() if v.get("status", {}).get("completed") is not None]
        if finished:
            break
        assert time.monotonic() < deadline, f"no prompt finished within {RUN_TIMEOUT:.0f} s of clicking Run"
        time.sleep(0.1)
    [entry] = finished
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    assert entry["prompt"][3]["client_id"] == ui.client_id()  # queued by this page's Run button
    ui.wait_for(
        f"(app.graph.nodes.find(n => n.type === '{NODE}').aithrivingRuns ?? 0) > {runs_before}",
        message="the run's cost delivered to the node",
    )
    return entry


def check_graph(ui: ComfyPage, workflow: dict) -> dict:
    """The loaded graph is the workflow: every node known, no missing-node dialog, our widgets as saved."""
    assert not [text for text in ui.dialog_texts() if NODE in text], "a dialog names the node as missing"
    nodes = {n["id"]: n for n in ui.graph_nodes()}
    assert {n_id: n["type"] for n_id, n in nodes.items()} == {
        str(n["id"]): n["type"] for n in workflow["nodes"]
    }
    assert all(n["registered"] and not n["has_errors"] for n in nodes.values()), nodes
    structure = next(n for n in nodes.values() if n["type"] == NODE)
    assert [w["name"] for w in structure["widgets"]] == WIDGETS
    assert [w["value"] for w in structure["widgets"]] == structure_widgets(workflow)
    assert structure["size"][0] > 200 and structure["size"][1] > 200
    assert [i["name"] for i in structure["inputs"] if i["linked"]] == ["image"]
    return structure


def assert_no_pack_errors_in_console(ui: ComfyPage) -> None:
    log = ui.log
    # The frontend looks nodes up in the Comfy Registry (api.comfy.org): there is no network here.
    offline = re.compile(r"^\[error\] Failed to load resource: net::ERR_\w+ +\(https://api\.comfy\.org/")
    # The help panel asks for docs/<node>/<locale>.md first, then docs/<node>.md: a 404 for a
    # language the pack has no page in (English lives in docs/<node>.md) is that lookup, not an error.
    help_probe = re.compile(
        rf"^\[error\] Failed to load resource: .*404.*{re.escape(PACK_URL_PART)}docs/{NODE}/(\w+)\.md\)$"
    )
    shipped = {path.stem for path in (REPO / "web" / "docs" / NODE).glob("*.md")}

    def expected(line: str) -> bool:
        probe = help_probe.match(line)
        return bool(offline.match(line) or (probe and probe.group(1) not in shipped))

    ours = [
        line
        for line in log.console
        if ("aithriving" in line.lower() or PACK_URL_PART in line)
        and line.startswith(("[error]", "[assert]"))
        and not expected(line)
    ]
    ours += [line for line in log.console if line.startswith("[warning] [aithrivingstructure]")]
    # The frontend warns when an extension uses what it deprecated (slot.link, ...): none may be ours.
    ours += [line for line in log.console if line.startswith("[warning] [deprecated-by-pack]")]
    ours += [e for e in log.exceptions if PACK_URL_PART in e]
    assert not ours, ours


class Pictures:
    """Screenshots of this run; with UPDATE_SCREENSHOTS=1 also the README's pictures and the thumbnails."""

    def __init__(self, ui: ComfyPage, directory: Path, update: bool) -> None:
        self.ui, self.directory, self.update = ui, directory, update

    def shoot(self, name: str, *, for_readme: bool = False) -> Path:
        path = self.ui.screenshot(self.directory / f"{name}.png")
        if self.update and for_readme:
            save_small_png(path.read_bytes(), REPO / "docs" / "screenshots" / f"{name}.png")
        return path

    def thumbnail(self, workflow: str) -> None:
        """The graph in a square: the template browser's thumbnail for this workflow (update runs only)."""
        if not self.update:
            return
        page = self.ui.page
        # A square of canvas clear of the sidebar (left), the tabs and Run bar (top), the zoom menu (bottom).
        width, height, left, top, bottom = 900, 960, 64, 140, 70  # top: below the "job completed" note too
        side = min(width - left, height - top - bottom)
        page.set_viewport_size({"width": width, "height": height})
        time.sleep(0.5)
        self.ui.frame_graph(
            left=left + 16, top=top + 16, right=width - left - side + 16, bottom=height - top - side + 16
        )
        shot = self.ui.screenshot(
            self.directory / f"thumbnail-{workflow}.png",
            clip={"x": left, "y": top, "width": side, "height": side},
        )
        save_thumbnail(shot.read_bytes(), WORKFLOW_DIR / f"{workflow}.jpg")
        page.set_viewport_size({"width": VIEWPORT[0], "height": VIEWPORT[1]})
        time.sleep(0.5)


@pytest.fixture
def pictures(comfy_page, screenshot_dir, update_pictures) -> Pictures:
    return Pictures(comfy_page, screenshot_dir, update_pictures)


@pytest.fixture(autouse=True)
def clear_standin(ui_standin: StandInServer):
    ui_standin.clear()


# -- what the server serves to the frontend --------------------------------------------------------


def test_server_lists_the_example_workflows_as_templates_with_thumbnails(ui_server):
    listing = http_get(ui_server, "/workflow_templates").json()
    assert sorted(listing[PACK]) == WORKFLOWS == ["structure_basic", "structure_batch", "structure_hybrid"]
    for name in WORKFLOWS:
        served = http_get(ui_server, f"/api/workflow_templates/{PACK}/{name}.json")
        assert served.status_code == 200 and served.json() == workflow_json(name)
        # The 1.32 frontend asks for <name>.jpg for every custom-node template.
        thumbnail = http_get(ui_server, f"/api/workflow_templates/{PACK}/{name}.jpg")
        assert thumbnail.status_code == 200, f"{name}.jpg missing in example_workflows/"
        image = Image.open(io.BytesIO(thumbnail.content))
        assert image.format == "JPEG" and image.width == image.height >= 256


def test_web_extension_and_help_pages_are_served(ui_server):
    assert f"{PACK_URL_PART}aithriving_structure.js" in http_get(ui_server, "/extensions").json()
    for path, heading in [
        ("docs/AIThrivingStructure.md", "# Structure (AIThriving)"),
        ("docs/AIThrivingStructure/fr.md", "# Génération par structure (AIThriving)"),
        ("docs/AIThrivingStructure/es.md", "# Estructura (AIThriving)"),
    ]:
        page = http_get(ui_server, f"{PACK_URL_PART}{path}")
        assert page.status_code == 200 and page.text.startswith(heading + "\n")


def test_translations_say_what_the_node_says_and_cover_every_input(ui_server):
    translations = http_get(ui_server, "/i18n").json()
    info = ui_server.object_info(NODE)
    inputs = node_inputs(info)
    english = translations["en"]["nodeDefs"][NODE]
    # English must repeat the node's own texts, or it would override them with stale ones.
    assert english["display_name"] == info["display_name"]
    assert english["description"] == info["description"]
    assert {name: entry["tooltip"] for name, entry in english["inputs"].items()} == {
        name: options["tooltip"] for name, options in inputs.items()
    }
    assert all(entry["name"] == name for name, entry in english["inputs"].items())
    assert english["outputs"] == {
        str(i): {"name": n, "tooltip": t}
        for i, (n, t) in enumerate(zip(info["output_name"], info["output_tooltips"], strict=True))
    }
    languages = sorted(translations)
    assert {"en", "fr"} <= set(languages)
    badge_keys = set(translations["en"]["aithrivingStructure"])
    for language in languages:
        node = translations[language]["nodeDefs"][NODE]
        assert node["display_name"] and node["description"]
        assert set(node["inputs"]) == set(inputs) and set(node["outputs"]) == set(english["outputs"])
        assert all(
            entry["name"] and entry["tooltip"]
            for entry in [*node["inputs"].values(), *node["outputs"].values()]
        )
        strings = translations[language]["aithrivingStructure"]
        assert set(strings) == badge_keys, language
        for key, text in strings.items():  # the same placeholders as English
            assert set(re.findall(r"\{(\w+)\}", text)) == set(
                re.findall(r"\{(\w+)\}", translations["en"]["aithrivingStructure"][key])
            ), (language, key)
    assert translations["fr"]["nodeDefs"][NODE]["display_name"] != english["display_name"]


# -- in the browser ---------------------------------------------------------------------------------


def test_template_browser_lists_the_pack_with_thumbnails(comfy_page, pictures):
    ui = comfy_page
    ui.open_template_browser()
    assert sorted(ui.show_pack_templates()) == WORKFLOWS
    thumbnails = ui.template_thumbnails()
    assert sorted(thumbnails) == WORKFLOWS
    for name, thumbnail in thumbnails.items():
        assert thumbnail["url"].endswith(f"/api/workflow_templates/{PACK}/{name}.jpg"), thumbnail
        assert thumbnail["status"] == 200 and not thumbnail["placeholder"], thumbnail
        assert thumbnail["width"] == thumbnail["height"] >= 256
    pictures.shoot("template-browser", for_readme=True)
    ui.close_dialogs()
    assert_no_pack_errors_in_console(ui)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_from_the_template_browser_runs_and_shows_image_and_cost(
    comfy_page, ui_server, ui_standin, pictures, name
):
    ui = comfy_page
    workflow = workflow_json(name)
    images = batch_size(workflow)
    seed = structure_widgets(workflow)[2]
    free_execution_cache(ui_server)  # so the node runs, whatever ran before in this server

    ui.open_template_browser()
    ui.show_pack_templates()
    ui.load_template(name)
    structure = check_graph(ui, workflow)
    before = ui.structure_node()
    assert before["estimate"] == f"≈ {CREDITS_PER_IMAGE * images} credits"
    assert before["estimate"] in before["badges"] and before["last_run"] == ""

    entry = run_from_ui(ui, ui_server)

    # What the service was asked, what it cost, and what the node says it cost.
    cost = ui.wait_for_last_run()
    paid = len(ui_standin.requests)
    assert paid in (
        0,
        images,
    )  # 0: this seed was paid for earlier in the session and came from the result store
    if paid:
        assert sorted(int(r.fields["seed"]) for r in ui_standin.requests) == list(range(seed, seed + images))
    assert cost["images"] == images and cost["from_store"] == images - paid
    assert (
        cost["credits"]
        == CREDITS_PER_IMAGE * paid
        == entry["outputs"][structure["id"]]["aithriving_cost"][0]["credits"]
    )
    expected_text = f"Last run: {cost['credits']} credits" + (
        f" ({images - paid} from the result store)" if paid < images else ""
    )
    assert cost["text"] == expected_text
    assert expected_text in ui.structure_node()["badges"]

    # Every image node shows what the server saved for it (the canvas loads images of nodes in view).
    ui.frame_graph()
    image_nodes = [n for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
    for node in image_nodes:
        saved = entry["outputs"][str(node["id"])]["images"]
        shown = ui.wait_for_node_images(str(node["id"]), len(saved))
        assert [re.search(r"filename=([^&]+)", src).group(1) for src in shown] == [
            i["filename"] for i in saved
        ]
    save_node = next(n for n in image_nodes if n["type"] == "SaveImage")
    assert len(entry["outputs"][str(save_node["id"])]["images"]) == images

    pictures.shoot(f"workflow-{name}", for_readme=True)
    pictures.thumbnail(name)
    assert_no_pack_errors_in_console(ui)


def test_dropped_workflow_file_runs_and_the_cost_follows_both_caches(
    comfy_page, ui_server, ui_standin, pictures
):
    ui = comfy_page
    workflow = workflow_json("structure_basic")
    free_execution_cache(ui_server)
    ui.drop_workflow_file(WORKFLOW_DIR / "structure_basic.json")
    check_graph(ui, workflow)
    assert ui.structure_node()["estimate"] == "≈ 6 credits"

    # First run: paid, or served by the pack's result store if this seed was paid earlier in this session.
    run_from_ui(ui, ui_server)
    cost = ui.wait_for_last_run()
    paid = len(ui_standin.requests)
    assert (cost["credits"], cost["from_store"]) == (6 * paid, 1 - paid)
    ui.wait_for_node_images("3", 1)

    # Run again, unchanged: ComfyUI reuses its output without running the node. Nothing was paid.
    ui_standin.clear()
    run_from_ui(ui, ui_server)
    cost = ui.wait_for_last_run()
    assert ui_standin.requests == []
    assert cost["reused"] and cost["text"] == "Last run: 0 credits (ComfyUI reused the previous result)"

    # After ComfyUI forgot its outputs the node runs, and the pack's result store answers for free.
    free_execution_cache(ui_server)
    run_from_ui(ui, ui_server)
    cost = ui.wait_for_last_run()
    assert ui_standin.requests == []
    assert not cost["reused"] and (cost["credits"], cost["from_store"]) == (0, 1)
    assert cost["text"] == "Last run: 0 credits (1 from the result store)"
    ui.frame_graph()
    pictures.shoot("dropped-from-cache")
    assert_no_pack_errors_in_console(ui)


def test_estimate_follows_the_batch_size_when_it_changes(comfy_page):
    ui = comfy_page
    ui.drop_workflow_file(WORKFLOW_DIR / "structure_batch.json")
    assert ui.structure_node()["estimate"] == "≈ 24 credits"
    ui.evaluate("""(() => { const n = app.graph.nodes.find(n => n.type === 'RepeatImageBatch');
        n.widgets.find(w => w.name === 'amount').value = 7; app.graph.setDirtyCanvas(true, true); })()""")
    assert ui.structure_node()["estimate"] == "≈ 42 credits"
    # Unplugged from what says the batch size: the price per image.
    ui.evaluate(f"""(() => {{ const n = app.graph.nodes.find(n => n.type === '{NODE}');
        n.disconnectInput(0); }})()""")
    assert ui.structure_node()["estimate"] == "≈ 6 credits per image"


@pytest.mark.frontend_min("1.26")  # the selection toolbox and its info button came after 1.25
def test_help_page_opens_from_the_node(comfy_page, pictures):
    ui = comfy_page
    ui.drop_workflow_file(WORKFLOW_DIR / "structure_basic.json")
    ui.frame_graph(left=360)
    ui.select_node(ui.structure_node()["id"])
    help_text = ui.open_help_of_selected_node("When something goes wrong")
    for text in (
        "6 credits per image",
        "outside_limits",
        "control_strength",
        "each queue is a new request",
        "Your account is out of credits",
        "AITHRIVING_API_KEY",
        "9,437,184 pixels",
    ):
        assert text in help_text, text
    panel_right = ui.widen_sidebar(560)
    ui.frame_graph(left=panel_right + 20)
    pictures.shoot("help-page", for_readme=True)
    assert_no_pack_errors_in_console(ui)


@pytest.mark.frontend_min("1.26")  # the selection toolbox and its info button came after 1.25
def test_french_shows_the_translated_node_and_help(comfy_page, ui_server, pictures):
    ui = comfy_page
    try:
        ui.set_setting("Comfy.Locale", "fr")
        ui.open()  # node names are translated when the page loads its node types
        ui.drop_workflow_file(WORKFLOW_DIR / "structure_basic.json")
        node = ui.structure_node()
        assert node["title"] == "Génération par structure (AIThriving)"
        assert node["estimate"] == "≈ 6 crédits"
        structure = next(n for n in ui.graph_nodes() if n["type"] == NODE)
        labels = {w["name"]: w["label"] for w in structure["widgets"]}
        assert labels["control_strength"] == "force_du_contrôle" and labels["seed"] == "graine"
        ui.frame_graph(left=360)
        ui.select_node(node["id"])
        help_text = ui.open_help_of_selected_node("En cas d'erreur")
        assert "6 crédits par image" in help_text
        panel_right = ui.widen_sidebar(560)
        ui.frame_graph(left=panel_right + 20)
        pictures.shoot("french", for_readme=True)
        assert_no_pack_errors_in_console(ui)
    finally:
        set_setting(ui_server, "Comfy.Locale", "en")


@pytest.mark.frontend_min("1.30")  # Nodes 2.0 shipped in 1.27, drawing node badges from 1.30 on
def test_cost_badges_in_the_nodes_2_rendering(comfy_page, ui_server, ui_standin):
    """The frontend's "Nodes 2.0" mode draws nodes as HTML: the badges must show there and update after a
    run."""
    ui = comfy_page
    try:
        ui.set_setting("Comfy.VueNodes.Enabled", True)
        free_execution_cache(ui_server)
        ui.open()
        ui.drop_workflow_file(WORKFLOW_DIR / "structure_batch.json")
        node_id = ui.structure_node()["id"]
        ui.wait_for(
            f"!!document.querySelector('[data-node-id=\"{node_id}\"]')", message="the node drawn as HTML"
        )
        assert "≈ 24 credits" in ui.rendered_texts_of_node(node_id)
        run_from_ui(ui, ui_server)
        last_run = ui.wait_for_last_run()["text"]
        assert last_run.startswith("Last run: ")
        # What the user reads on the node, without toggling the mode or reloading the page.
        node = ui.page.locator(f'[data-node-id="{node_id}"]')
        node.get_by_text(last_run, exact=True).wait_for(state="visible", timeout=15_000)
        # The cost lives in node state for the redraw, but is not saved with the workflow.
        saved = ui.evaluate(
            f"app.graph.serialize().nodes.find(n => String(n.id) === {json.dumps(node_id)}).properties"
        )
        assert not [key for key in saved if key.startswith("aithriving")], saved
        assert_no_pack_errors_in_console(ui)
    finally:
        set_setting(ui_server, "Comfy.VueNodes.Enabled", False)


def test_a_new_node_starts_at_seed_0_fixed_and_randomize_makes_each_queue_a_new_request(
    comfy_page, ui_server, ui_standin
):
    """Issue 9: seed 0 with "fixed" is the default of a node the user adds; "randomize", when the user
    picks it, changes the seed after each queue, so each queue is a new (paid) request, while "fixed"
    repeats the same request, which the result store answers for free."""
    ui = comfy_page
    ui.drop_workflow_file(WORKFLOW_DIR / "structure_basic.json")
    saved_control = structure_widgets(workflow_json("structure_basic"))[3]
    assert ui.structure_widget("control_after_generate") == saved_control  # a loaded workflow keeps its own

    # A node added to the graph (as the node search adds it): seed 0, control on "fixed".
    added = ui.add_node(NODE)
    values = ui.evaluate(f"""Object.fromEntries((app.graph.getNodeById({json.dumps(added)})
        ?? app.graph.getNodeById(Number({json.dumps(added)}))).widgets.map(w => [w.name, w.value]))""")
    assert values["seed"] == 0 and values["control_after_generate"] == "fixed", values
    ui.evaluate(f"""(() => {{ const n = app.graph.getNodeById({json.dumps(added)}) ?? app.graph.getNodeById(
        Number({json.dumps(added)})); app.graph.remove(n); }})()""")

    # "fixed" with a seed: queued twice, one request; the second run is served by the result store.
    ui.set_structure_widget("control_after_generate", "fixed")
    ui.set_structure_widget("seed", 4242)
    for _ in range(2):
        free_execution_cache(ui_server)  # so ComfyUI runs the node each time instead of reusing its output
        run_from_ui(ui, ui_server)
    assert [int(r.fields["seed"]) for r in ui_standin.requests] in ([4242], [])  # [] if paid earlier
    assert ui.structure_widget("seed") == 4242
    ui_standin.clear()

    # "randomize": the frontend picks a new seed after each queue ("control after generate"), so the
    # first queue still sends 4242 (already paid: from the store) and every later one is a new request.
    ui.set_structure_widget("control_after_generate", "randomize")
    seeds_queued = []
    for _ in range(3):
        free_execution_cache(ui_server)
        entry = run_from_ui(ui, ui_server)
        structure_id = ui.structure_node()["id"]
        seeds_queued.append(entry["prompt"][2][structure_id]["inputs"]["seed"])
    assert seeds_queued[0] == 4242 and len(set(seeds_queued)) == 3, seeds_queued
    sent = [int(r.fields.get("seed", 0)) for r in ui_standin.requests]
    assert sent == seeds_queued[1:], (sent, seeds_queued)  # one new paid request per later queue
    assert_no_pack_errors_in_console(ui)
