"""The frontend sweep: a short smoke test of the pack on one frontend per few minor versions.

Off by default (every test here is deselected); ``COMFY_FRONTEND_SWEEP=1`` turns it on and makes it the
only thing tests/browser runs, over ``tests.comfy.matrix.sweep_targets()`` (1.25 to the newest, each on
the ComfyUI of its time)::

    COMFY_FRONTEND_SWEEP=1 python -m pytest tests/browser/test_frontend_sweep.py

Each step is one test, so each cell of the results table is one test's outcome; a step that frontend
lacks (node badges in Nodes 2.0 before 1.30, the help button before 1.26) is deselected and reads
"n/a". The table is printed at the end and written to ``.cache/frontend-sweep.md``; with
``UPDATE_README=1`` it also replaces the table in README.md's Compatibility section.
"""

from __future__ import annotations

import pytest

from structure_api.standin import StandInServer
from tests.browser.comfy_page import NODE
from tests.browser.conftest import set_setting
from tests.browser.test_web_ui import (
    CREDITS_PER_IMAGE,
    WORKFLOW_DIR,
    assert_no_pack_errors_in_console,
    check_graph,
    free_execution_cache,
    run_from_ui,
    workflow_json,
)

# The steps, in the table's column order: test name -> column heading.
STEPS = {
    "test_sweep_add_node": "add node",
    "test_sweep_run_and_badges": "run, image, badges",
    "test_sweep_nodes_2_badges": "Nodes 2.0 badges",
    "test_sweep_help": "help page",
}


@pytest.fixture(autouse=True)
def clear_standin(ui_standin: StandInServer):
    ui_standin.clear()


def test_sweep_add_node(comfy_page):
    """The node search's way of adding a node: the node, its widgets and its price badge."""
    ui = comfy_page
    added = ui.add_node(NODE)
    node = ui.evaluate(f"""(() => {{
        const n = app.graph.getNodeById({added!r}) ?? app.graph.getNodeById(Number({added!r}));
        return {{widgets: Object.fromEntries(n.widgets.map(w => [w.name, w.value])),
                 estimate: n.aithrivingEstimate(),
                 badges: (n.badges ?? []).map(b => typeof b === 'function' ? b() : b)
                     .map(b => b.text)}}; }})()""")
    assert node["widgets"]["seed"] == 0 and node["widgets"]["control_after_generate"] == "fixed", node
    assert node["estimate"] == f"≈ {CREDITS_PER_IMAGE} credits per image"
    assert node["estimate"] in node["badges"]
    assert_no_pack_errors_in_console(ui)


def test_sweep_run_and_badges(comfy_page, ui_server, ui_standin):
    """A dropped workflow runs from the Run button; the image and the last run's cost show on the canvas."""
    ui = comfy_page
    workflow = workflow_json("structure_basic")
    free_execution_cache(ui_server)
    ui.drop_workflow_file(WORKFLOW_DIR / "structure_basic.json")
    check_graph(ui, workflow)
    assert ui.structure_node()["estimate"] == f"≈ {CREDITS_PER_IMAGE} credits"
    entry = run_from_ui(ui, ui_server)
    cost = ui.wait_for_last_run()
    paid = len(ui_standin.requests)
    assert (cost["credits"], cost["from_store"]) == (CREDITS_PER_IMAGE * paid, 1 - paid)
    assert cost["text"] in ui.structure_node()["badges"]
    saved = entry["outputs"]["3"]["images"]
    ui.frame_graph()
    ui.wait_for_node_images("3", len(saved))
    assert_no_pack_errors_in_console(ui)


@pytest.mark.frontend_min("1.30")  # Nodes 2.0 shipped in 1.27, drawing node badges from 1.30 on
def test_sweep_nodes_2_badges(comfy_page, ui_server):
    """In Nodes 2.0 the node, drawn as HTML, shows the estimate, then the last run without a reload."""
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
        assert f"≈ {4 * CREDITS_PER_IMAGE} credits" in ui.rendered_texts_of_node(node_id)
        run_from_ui(ui, ui_server)
        last_run = ui.wait_for_last_run()["text"]
        node = ui.page.locator(f'[data-node-id="{node_id}"]')
        node.get_by_text(last_run, exact=True).wait_for(state="visible", timeout=15_000)
        assert_no_pack_errors_in_console(ui)
    finally:
        set_setting(ui_server, "Comfy.VueNodes.Enabled", False)


@pytest.mark.frontend_min("1.26")  # the selection toolbox and its info button came after 1.25
def test_sweep_help(comfy_page):
    """The node's help page opens from the selection toolbox."""
    ui = comfy_page
    ui.drop_workflow_file(WORKFLOW_DIR / "structure_basic.json")
    ui.frame_graph(left=360)
    ui.select_node(ui.structure_node()["id"])
    help_text = ui.open_help_of_selected_node("When something goes wrong")
    assert f"{CREDITS_PER_IMAGE} credits per image" in help_text
    assert_no_pack_errors_in_console(ui)
