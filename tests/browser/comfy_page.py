"""ComfyUI's web UI as a user meets it, driven by Playwright on any frontend of the test matrix.

Actions are real clicks (Playwright locators: roles, visible text, the frontend's own ``data-testid``s,
which its own end-to-end tests rely on) and real file drops (DevTools ``Input.dispatchDragEvent``,
which Playwright has no call for). What the UI shows is read back as rendered text, or through the
app's public JavaScript API (``window.app``: ``graph``, ``loadGraphData``, ``extensionManager``), never
through one version's private DOM classes or id types: node ids are numbers in frontend 1.32 and
strings in 1.58, so every id crosses into Python as a string.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from playwright.sync_api import ConsoleMessage, Locator, Page, Response

if TYPE_CHECKING:
    from tests.comfy.harness import ComfyServer

NODE = "AIThrivingStructure"
PACK = "comfyui-aithriving-structure"
# web/aithriving_structure.js registers itself under this name (namespaced, as the Registry's lint wants).
EXTENSION_NAME = "aithrivingstructure.node"
# Everything this pack puts in the browser is served from here.
PACK_URL_PART = f"/extensions/{PACK}/"

# Browser-side state of a returning user: the "Nodes 2.0" banner was dismissed.
RETURNING_USER_SCRIPT = "try { localStorage.setItem('vueNodesBannerDismissed', 'true') } catch (e) {}"

# The frontend announces deprecated API use with console.warn from its own code; this names the
# warnings whose call stack passes through this pack's files, so a test can tell ours from the core's.
DEPRECATION_PROBE_SCRIPT = """(() => {
  const warn = console.warn.bind(console);
  console.warn = (...args) => {
    const message = String(args[0] ?? '');
    if (/deprecat/i.test(message) && (new Error().stack ?? '').includes(%s)) {
      warn('[deprecated-by-pack] ' + message);
    }
    return warn(...args);
  };
})();""" % json.dumps(PACK_URL_PART)

# JavaScript: the open graph's Structure node (the first one).
_STRUCTURE = f"app.graph.nodes.find(n => (n.comfyClass ?? n.type) === {json.dumps(NODE)})"


def js(value: Any) -> str:
    """A Python value as a JavaScript literal."""
    return json.dumps(value)


class BrowserLog:
    """What a page printed and fetched: console lines, uncaught errors, (url, status) of responses."""

    def __init__(self) -> None:
        self.console: list[str] = []
        self.exceptions: list[str] = []
        self.responses: list[tuple[str, int]] = []

    def attach(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on(
            "pageerror", lambda error: self.exceptions.append(f"{error.name}: {error.message}\n{error.stack}")
        )
        page.on("response", self._on_response)

    def _on_console(self, message: ConsoleMessage) -> None:
        where = message.location.get("url") if message.location else ""
        self.console.append(f"[{message.type}] {message.text}" + (f"  ({where})" if where else ""))

    def _on_response(self, response: Response) -> None:
        self.responses.append((response.url, response.status))

    def text(self) -> str:
        """Everything, for a failure report or a log file."""
        parts = ["== console", *self.console, "== uncaught exceptions", *self.exceptions]
        return "\n".join(parts) + "\n"


class ComfyPage:
    """The ComfyUI tab: open it, use the template browser, load, drop and run workflows, read the graph."""

    def __init__(
        self, page: Page, url: str, log: BrowserLog | None = None, *, server: ComfyServer | None = None
    ) -> None:
        self.page = page
        self.url = url
        self.server = server  # the ComfyUI this page is open on, when the fixtures started it
        self.log = log or BrowserLog()
        if log is None:
            self.log.attach(page)

    # -- loading ------------------------------------------------------------------------------

    def open(self, timeout: float = 60.0) -> ComfyPage:
        """Load the UI and wait until the app, this pack's extension and its node type are there."""
        self.page.goto(self.url)
        self.wait_for(
            f"""!!(window.app && window.app.graph && window.app.canvas
                && window.LiteGraph?.registered_node_types?.[{js(NODE)}]
                && (window.app.extensions ?? []).some(e => e.name === {js(EXTENSION_NAME)}))""",
            timeout=timeout,
            message="ComfyUI with the pack's node and extension",
        )
        self.wait_for("window.app.vueAppReady !== false", message="the app ready")
        return self

    def frontend_version(self) -> str:
        """The frontend's own version string (window.__COMFYUI_FRONTEND_VERSION__)."""
        return self.page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? ''")

    def wait_for(self, expression: str, *, timeout: float = 30.0, message: str = "the condition") -> Any:
        """Poll a JavaScript expression until it is truthy; its value. Fails naming what was awaited."""
        try:
            handle = self.page.wait_for_function(f"() => ({expression})", timeout=timeout * 1000, polling=100)
        except Exception as error:  # Playwright's TimeoutError, with the page state in the report
            raise AssertionError(f"waited {timeout:.0f} s for {message}: {error}") from None
        return handle.json_value()

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def visible_dialog(self) -> Locator:
        return self.page.get_by_role("dialog").filter(visible=True)

    def dialog_texts(self) -> list[str]:
        """The text of every dialog on screen."""
        dialogs = self.visible_dialog()
        return [dialogs.nth(i).inner_text() for i in range(dialogs.count())]

    def close_dialogs(self) -> None:
        """Escape, as a user closes a dialog, until none is open."""
        for _ in range(5):
            if not self.visible_dialog().count():
                return
            self.page.keyboard.press("Escape")
            time.sleep(0.3)

    # -- template browser ---------------------------------------------------------------------

    def open_template_browser(self) -> None:
        """Click "Templates" in the left sidebar."""
        self.page.get_by_role("button", name="Templates", exact=True).first.click()
        self.page.get_by_test_id("template-workflows-content").wait_for(state="visible")

    def show_pack_templates(self) -> list[str]:
        """Pick this pack in the browser's list; the names of the template cards it shows."""
        entry = self.visible_dialog().get_by_text(PACK, exact=True).first
        entry.wait_for(state="visible")
        time.sleep(0.5)  # frontend 1.25 lists the custom templates before it can filter on them
        entry.click()
        return self.wait_for(
            """(() => {
                const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
                    .filter(c => c.offsetParent !== null);
                const names = cards.map(c => c.dataset.testid.slice('template-workflow-'.length));
                return names.length && names.every(n => n.startsWith('structure_')) ? names : null;
            })()""",
            message="the pack's template cards",
        )

    def template_thumbnails(self) -> dict[str, dict]:
        """For each template card: its picture once loaded (size, whether it is the frontend's placeholder)
        and the URL and HTTP status of the thumbnail the page fetched for it."""
        # Each card's picture as seen loaded at some poll: frontend 1.25 loads a card's picture only while
        # the card is in view and unloads it when it leaves (its dialog shows two cards a row, so the
        # third is below the fold), so the polls scroll to each card not seen loaded yet in turn.
        self.evaluate("window.__templateThumbnails = {}")
        pictures = self.wait_for(
            """(() => {
                const seen = window.__templateThumbnails;
                const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
                const nameOf = card => card.dataset.testid.slice('template-workflow-'.length);
                for (const card of cards) {
                    const name = nameOf(card);
                    const img = [...card.querySelectorAll('img')].find(i => i.src.includes(name) || i.alt === name)
                        ?? card.querySelector('img');
                    if (img && img.complete && img.naturalWidth) {
                        seen[name] = {placeholder: img.src.includes('default-template'),
                                      width: img.naturalWidth, height: img.naturalHeight};
                    }
                }
                const waiting = cards.find(card => !(nameOf(card) in seen));
                if (waiting) {
                    waiting.scrollIntoView({block: 'center'});
                    return null;
                }
                return cards.length ? seen : null;
            })()""",
            timeout=20,
            message="every template thumbnail loaded",
        )
        for name, picture in pictures.items():
            fetched = [
                (url, status)
                for url, status in self.log.responses
                if "/workflow_templates/" in url and url.split("?")[0].endswith(f"/{name}.jpg")
            ]
            picture["url"], picture["status"] = fetched[-1] if fetched else (None, None)
        return pictures

    def load_template(self, name: str) -> None:
        """Click a template card and wait until its workflow is the open one."""
        self.page.get_by_test_id(f"template-workflow-{name}").click()
        self.wait_for_workflow(name)

    # -- loading a workflow -------------------------------------------------------------------

    def load_workflow(self, workflow: Mapping[str, Any] | Path, name: str | None = None) -> None:
        """Open a UI-format workflow (a dict or a .json file) through the app's public app.loadGraphData."""
        if isinstance(workflow, Path):
            name = name or workflow.stem
            workflow = json.loads(workflow.read_text())
        self.page.evaluate(
            "([graph, name]) => app.loadGraphData(graph, true, true, name)", [workflow, name or "workflow"]
        )
        self.wait_for(f"!!{_STRUCTURE}", message="the workflow's Structure node in the graph")
        time.sleep(0.3)  # the frontend checks for missing nodes right after configuring the graph

    def drop_workflow_file(self, path: Path) -> None:
        """Drop a workflow file from the desktop onto a free spot of the canvas."""
        # A point where the canvas itself is on top (not a side panel or a menu over it).
        # Wait for it: right after a page load a toast or a closing dialog may still cover the canvas.
        spot = self.wait_for(
            """(() => { const canvas = app.canvas.canvas;
                const fractions = [0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2, 0.9, 0.15];
                for (const fy of fractions) for (const fx of fractions) {
                    const x = innerWidth * fx, y = innerHeight * fy;
                    if (document.elementFromPoint(x, y) === canvas) return {x, y};
                }
                return null; })()""",
            timeout=15,
            message="a free spot on the canvas to drop the file on",
        )
        self.drop_files(spot["x"], spot["y"], [path])
        self.wait_for_workflow(Path(path).stem)

    def drop_files(self, x: float, y: float, paths: list[Path]) -> None:
        """Drag files from the desktop and drop them at (x, y), as the operating system does.

        Playwright can set files on an <input>, not drag them in from outside the page; the DevTools
        protocol can, so this goes through a CDP session of the same page.
        """
        session = self.page.context.new_cdp_session(self.page)
        try:
            data = {"items": [], "files": [str(Path(p).resolve()) for p in paths], "dragOperationsMask": 1}
            for kind in ("dragEnter", "dragOver", "drop"):
                session.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
        finally:
            session.detach()

    def wait_for_workflow(self, name: str) -> None:
        self.wait_for(
            f"""(app.extensionManager?.workflow?.activeWorkflow?.filename ?? '').replace(/ \\(\\d+\\)$/, '') === {js(name)}
                && !!{_STRUCTURE}""",
            timeout=20,
            message=f"workflow {name} open with the Structure node",
        )
        time.sleep(0.3)  # the frontend checks for missing nodes right after configuring the graph

    # -- the graph ----------------------------------------------------------------------------

    def graph_nodes(self) -> list[dict]:
        """Every node of the open graph: id (a string), type, title, whether its type is registered, widgets."""
        return self.page.evaluate(
            """app.graph.nodes.map(n => ({
                id: String(n.id), type: n.type, title: n.title, mode: n.mode,
                registered: !!LiteGraph.registered_node_types[n.type], has_errors: !!n.has_errors,
                size: [n.size[0], n.size[1]],
                inputs: (n.inputs || []).map(i => ({name: i.name, label: i.label ?? null,
                    linked: n.getInputLink ? !!n.getInputLink(n.inputs.indexOf(i)) : i.link != null})),
                widgets: (n.widgets || []).filter(w => !w.name.startsWith('$$'))
                    .map(w => ({name: w.name, label: w.label ?? null, type: w.type, value: w.value})),
            }))"""
        )

    def structure_node(self) -> dict:
        """The Structure node's id (a string), title and cost texts, and the texts of all its badges."""
        return self.page.evaluate(
            f"""(() => {{ const n = {_STRUCTURE};
                return {{id: String(n.id), title: n.title, estimate: n.aithrivingEstimate(), last_run: n.aithrivingLastRun(),
                        badges: (n.badges ?? []).map(b => typeof b === 'function' ? b() : b).map(b => b.text)}}; }})()"""
        )

    def structure_widget(self, name: str) -> Any:
        """The value of one of the Structure node's widgets."""
        return self.page.evaluate(f"{_STRUCTURE}.widgets.find(w => w.name === {js(name)})?.value")

    def set_structure_widget(self, name: str, value: Any) -> None:
        """Set one of the Structure node's widgets, as a user does by editing it (its callback runs)."""
        self.page.evaluate(
            f"""(value) => {{ const w = {_STRUCTURE}.widgets.find(w => w.name === {js(name)});
                w.value = value; w.callback?.(value); app.graph.setDirtyCanvas(true, true); }}""",
            value,
        )

    def set_setting(self, setting: str, value: Any) -> None:
        """Change a setting through the app's public settings API (what the settings dialog calls)."""
        self.page.evaluate("([id, value]) => app.extensionManager.setting.set(id, value)", [setting, value])

    def add_node(self, node_type: str) -> str:
        """Add a node as the node search does (LiteGraph.createNode, then graph.add); its id."""
        return self.page.evaluate(
            """(type) => { const node = LiteGraph.createNode(type);
                node.pos = [200, 200]; app.graph.add(node); app.graph.setDirtyCanvas(true, true);
                return String(node.id); }""",
            node_type,
        )

    # -- running ------------------------------------------------------------------------------

    def client_id(self) -> str:
        return self.page.evaluate("app.api.clientId ?? app.api.initialClientId")

    def click_run(self) -> None:
        """Click the Run button of the action bar."""
        self.page.get_by_role("button", name="Run", exact=True).first.click()

    def structure_runs(self) -> int:
        """How many run results the Structure node has received in this page."""
        return self.page.evaluate(f"{_STRUCTURE}?.aithrivingRuns ?? 0")

    def wait_for_node_images(self, node_id: str, count: int, timeout: float = 30.0) -> list[str]:
        """Wait until a node shows `count` loaded images; their URLs."""
        return self.wait_for(
            f"""(() => {{ const n = app.graph.getNodeById({js(node_id)}) ?? app.graph.getNodeById(Number({js(node_id)}));
                const imgs = n?.imgs ?? [];
                return imgs.length === {count} && imgs.every(i => i.complete && i.naturalWidth > 0)
                    ? imgs.map(i => i.src) : null; }})()""",
            timeout=timeout,
            message=f"{count} image(s) shown on node {node_id}",
        )

    def wait_for_last_run(self, timeout: float = 30.0) -> dict:
        return self.wait_for(
            f"""(() => {{ const n = {_STRUCTURE};
                return n?.aithrivingLastCost ? {{...n.aithrivingLastCost, text: n.aithrivingLastRun()}} : null; }})()""",
            timeout=timeout,
            message="the last run's cost on the Structure node",
        )

    def select_node(self, node_id: str) -> None:
        """Click a node's title bar on the canvas."""
        point = self.page.evaluate(
            f"""(() => {{ const n = app.graph.getNodeById({js(node_id)}) ?? app.graph.getNodeById(Number({js(node_id)}));
                const [x, y] = app.canvasPosToClientPos([n.pos[0] + 60, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
                return {{x, y}}; }})()"""
        )
        self.page.mouse.click(point["x"], point["y"])
        self.wait_for(
            f"""[...(app.canvas.selectedItems ?? []), ...Object.values(app.canvas.selected_nodes ?? {{}})]
                .some(item => String(item.id) === {js(node_id)})""",
            message=f"node {node_id} selected",
        )

    def open_node_menu(self, node_id: str, entry: str) -> Locator:
        """Right-click a node's title bar, as a user opens its menu; the menu entry of that text, once shown."""
        point = self.page.evaluate(
            f"""(() => {{ const n = app.graph.getNodeById({js(node_id)}) ?? app.graph.getNodeById(Number({js(node_id)}));
                const [x, y] = app.canvasPosToClientPos([n.pos[0] + 60, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
                return {{x, y}}; }})()"""
        )
        self.page.mouse.click(point["x"], point["y"], button="right")
        item = self.page.get_by_text(entry, exact=True).filter(visible=True)
        item.first.wait_for(state="visible", timeout=10_000)
        return item

    def open_help_of_selected_node(self, heading: str) -> str:
        """Open the selected node's help (the selection toolbox's info button); its text once it shows `heading`."""
        self.page.get_by_test_id("info-button").filter(visible=True).first.click()
        heading_locator = self.page.get_by_role("heading", name=heading, exact=True)
        heading_locator.wait_for(state="visible")
        return heading_locator.evaluate(
            """(h) => { let box = h.parentElement;
                while (box.parentElement && box.innerText.length < 400) box = box.parentElement;
                return box.innerText; }"""
        )

    def widen_sidebar(self, width: float) -> float:
        """Drag the side panel's edge to about `width` pixels, where the frontend lets one; its right edge."""
        edge = self.page.locator(".p-splitter-gutter, [role=separator]").filter(visible=True)
        if edge.count():
            box = edge.first.bounding_box()
            if box and box["height"] > 0:
                y = box["y"] + box["height"] / 2
                self.page.mouse.move(box["x"] + box["width"] / 2, y)
                self.page.mouse.down()
                self.page.mouse.move(width, y, steps=8)
                self.page.mouse.up()
                time.sleep(0.3)
        return self.page.evaluate(
            """(() => { const h = [...document.querySelectorAll('h1, h2')].find(e => e.offsetParent !== null
                    && e.getBoundingClientRect().left < innerWidth / 2 && e.closest('[class*=sidebar], aside'));
                const panel = h?.closest('[class*=sidebar], aside');
                return panel ? panel.getBoundingClientRect().right : 360; })()"""
        )

    # -- Nodes 2.0 (HTML) rendering -----------------------------------------------------------

    def rendered_texts_of_node(self, node_id: str) -> list[str]:
        """Every text shown inside a node drawn as HTML (Nodes 2.0): what a user reads on it."""
        node = self.page.locator(f'[data-node-id="{node_id}"]').first
        return [line.strip() for line in node.inner_text().splitlines() if line.strip()]

    # -- pictures -----------------------------------------------------------------------------

    def frame_graph(
        self,
        *,
        left: float = 80,
        top: float = 150,
        right: float = 40,
        bottom: float = 40,
        max_scale: float = 1.0,
    ) -> None:
        """Zoom and pan so every node (with its title and badges) fits between the margins."""
        self.page.evaluate(
            f"""(() => {{
                const nodes = app.graph.nodes;
                const title = LiteGraph.NODE_TITLE_HEIGHT, badge = 24;
                const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title - badge));
                const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
                const rect = app.canvas.canvas.getBoundingClientRect();
                const width = rect.width - {left} - {right}, height = rect.height - {top} - {bottom};
                const scale = Math.min({max_scale}, width / (x1 - x0), height / (y1 - y0));
                app.canvas.ds.scale = scale;
                app.canvas.ds.offset[0] = ({left} + (width - (x1 - x0) * scale) / 2) / scale - x0;
                app.canvas.ds.offset[1] = ({top} + (height - (y1 - y0) * scale) / 2) / scale - y0;
                app.canvas.setDirty(true, true);
            }})()"""
        )
        time.sleep(0.4)  # two frames at least

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), clip=clip)
        return path


def save_small_png(png: bytes, path: Path) -> Path:
    """Write a screenshot as a compact PNG (256-colour palette: UI pictures lose nothing visible)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="PNG", optimize=True
    )
    return path


def save_thumbnail(png: bytes, path: Path, size: int = 512) -> Path:
    """Write a square JPEG thumbnail (what the template browser shows for a custom node's workflow)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=85, optimize=True, progressive=True)
    return path
