"""ComfyUI's web UI (frontend 1.32.x) as a user meets it, driven through a CDP ``Page``.

Actions are real mouse clicks and file drops where a user would click or drop; what the UI shows
is read back from the page (DOM, and the frontend's ``window.app`` graph, which 1.32 exposes).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from tests.browser.cdp import Page

NODE = "AIThrivingStructure"
PACK = "comfyui-aithriving-structure"
EXTENSION_NAME = "aithriving.structure"
# Everything this pack puts in the browser is served from here.
PACK_URL_PART = f"/extensions/{PACK}/"

# Browser-side state of a returning user: the "Nodes 2.0" banner was dismissed.
RETURNING_USER_SCRIPT = "try { localStorage.setItem('vueNodesBannerDismissed', 'true') } catch (e) {}"


def js(value: Any) -> str:
    """A Python value as a JavaScript literal."""
    return json.dumps(value)


class ComfyPage:
    """The ComfyUI tab: open it, use the template browser, drop files, run, read the graph, take pictures."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url

    # -- loading ------------------------------------------------------------------------------

    def open(self, timeout: float = 60.0) -> None:
        """Load the UI and wait until the app, our extension and our node type are there."""
        self.page.goto(self.url)
        self.page.wait_for(
            f"""!!(window.app && window.app.vueAppReady && window.app.graph && window.app.canvas
                && window.LiteGraph?.registered_node_types?.[{js(NODE)}]
                && window.app.extensions.some(e => e.name === {js(EXTENSION_NAME)}))""",
            timeout=timeout, message="ComfyUI with the pack's node and extension")

    def missing_nodes_dialog(self) -> str | None:
        """The text of the frontend's "missing nodes" dialog if it is open."""
        return self.page.evaluate(
            "document.querySelector('[aria-labelledby=global-missing-nodes]')?.closest('[role=dialog]')"
            "?.innerText ?? null")

    def close_dialogs(self) -> None:
        self.page.evaluate("document.querySelectorAll('[role=dialog] .p-dialog-close-button')"
                           ".forEach(b => b.click())")

    # -- template browser ---------------------------------------------------------------------

    def open_template_browser(self) -> None:
        """Click "Templates" in the left sidebar."""
        self.page.click("document.querySelector('.side-tool-bar-container button[class*=templates]')",
                        what="Templates button in the sidebar")
        self.page.wait_for("!!document.querySelector('[data-testid=template-workflows-content]')",
                           message="the template browser")

    def show_pack_templates(self) -> list[str]:
        """Pick this pack under "Extensions" in the browser's list; the template names it shows."""
        self.page.click(
            f"""[...document.querySelectorAll('[role=dialog] [role=button]')]
                .find(e => e.textContent.trim() === {js(PACK)})""", what=f"{PACK} in the template browser")
        return self.page.wait_for(
            f"""(() => {{
                const title = [...document.querySelectorAll('[role=dialog] *')].some(e => e.children.length === 0
                    && e.textContent.trim() === {js(PACK)} && !e.closest('[role=button]'));
                const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
                return title && cards.length ? cards.map(c => c.dataset.testid.slice('template-workflow-'.length)) : null;
            }})()""", message="the pack's templates")

    def template_thumbnails(self) -> dict[str, dict]:
        """For each template card: its picture once loaded (size, whether it is the frontend's placeholder)
        and the URL and HTTP status of the thumbnail the page fetched for it."""
        pictures = self.page.wait_for(
            """(() => {
                const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
                const result = {};
                for (const card of cards) {
                    const name = card.dataset.testid.slice('template-workflow-'.length);
                    const img = card.querySelector(`img[alt="${name}"]`);
                    if (!img || !img.complete || !img.naturalWidth) return null;
                    result[name] = {placeholder: img.src.includes('default-template'),
                                    width: img.naturalWidth, height: img.naturalHeight};
                }
                return Object.keys(result).length ? result : null;
            })()""", timeout=20, message="every template thumbnail loaded")
        for name, picture in pictures.items():
            fetched = [(url, status) for url, status in self.page.responses
                       if "/workflow_templates/" in url and url.split("?")[0].endswith(f"/{name}.jpg")]
            picture["url"], picture["status"] = fetched[-1] if fetched else (None, None)
        return pictures

    def load_template(self, name: str) -> None:
        """Click a template card and wait until its workflow is the open one."""
        self.page.click(f"document.querySelector('[data-testid=\"template-workflow-{name}\"]')",
                        what=f"template card {name}")
        self.wait_for_workflow(name)

    # -- loading by dropping the file ---------------------------------------------------------

    def drop_workflow_file(self, path: Path) -> None:
        """Drop a workflow file from the desktop onto the middle of the canvas."""
        # A point where the canvas itself is on top (not a side panel or a menu over it).
        # Wait for it: right after a page load a toast or a closing dialog may still cover the canvas.
        box = self.page.wait_for(
            """(() => { const canvas = document.getElementById('graph-canvas');
                const fractions = [0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2, 0.9, 0.15];
                for (const fy of fractions) for (const fx of fractions) {
                    const x = innerWidth * fx, y = innerHeight * fy;
                    if (document.elementFromPoint(x, y) === canvas) return {x, y};
                }
                return null; })()""", timeout=15, message="a free spot on the canvas to drop the file on")
        self.page.drop_files(box["x"], box["y"], [path])
        self.wait_for_workflow(Path(path).stem)

    def wait_for_workflow(self, name: str) -> None:
        self.page.wait_for(
            f"""(app.extensionManager.workflow.activeWorkflow?.filename ?? '').replace(/ \\(\\d+\\)$/, '') === {js(name)}
                && app.graph.nodes.some(n => n.type === {js(NODE)})""",
            timeout=20, message=f"workflow {name} open with the Structure node")
        time.sleep(0.3)  # the frontend checks for missing nodes right after configuring the graph

    # -- the graph ----------------------------------------------------------------------------

    def graph_nodes(self) -> list[dict]:
        """Every node of the open graph: id, type, title, whether its type is registered, widgets."""
        return self.page.evaluate(
            """app.graph.nodes.map(n => ({
                id: n.id, type: n.type, title: n.title, mode: n.mode,
                registered: !!LiteGraph.registered_node_types[n.type], has_errors: !!n.has_errors,
                size: [n.size[0], n.size[1]],
                inputs: (n.inputs || []).map(i => ({name: i.name, label: i.label ?? null, linked: i.link != null})),
                widgets: (n.widgets || []).filter(w => !w.name.startsWith('$$'))
                    .map(w => ({name: w.name, label: w.label ?? null, type: w.type, value: w.value})),
            }))""")

    def structure_node(self) -> dict:
        """Our node's id, title and the texts of its two cost badges."""
        return self.page.evaluate(
            f"""(() => {{ const n = app.graph.nodes.find(n => n.type === {js(NODE)});
                return {{id: n.id, title: n.title, estimate: n.aithrivingEstimate(), last_run: n.aithrivingLastRun(),
                        badges: n.badges.map(b => typeof b === 'function' ? b() : b).map(b => b.text)}}; }})()""")

    def set_locale_in_settings(self, label: str) -> None:
        """Settings dialog → Language → pick the language shown as `label` (e.g. "Français")."""
        self.page.evaluate("app.extensionManager.command.execute('Comfy.ShowSettingsDialog')")
        self.page.click("document.getElementById('Comfy.Locale')", what="the Language setting")
        self.page.click(f"[...document.querySelectorAll('[role=option]')].find(o => o.textContent.trim() === {js(label)})",
                        what=f"language {label}")
        self.page.wait_for(f"document.getElementById('Comfy.Locale')?.innerText.trim() === {js(label)}",
                           message=f"{label} chosen")
        self.close_dialogs()

    # -- running ------------------------------------------------------------------------------

    def client_id(self) -> str:
        return self.page.evaluate("app.api.clientId")

    def click_run(self) -> None:
        """Click the Run button of the action bar (its label is translated, its play icon is not)."""
        self.page.click(
            "[...document.querySelectorAll('.actionbar button')].find(b => b.querySelector('i[class*=\"lucide--play\"]'))"
            " ?? [...document.querySelectorAll('button')].find(b => b.querySelector('i[class*=\"lucide--play\"]'))",
            what="the Run button")

    def wait_for_node_images(self, node_id: int, count: int, timeout: float = 30.0) -> list[str]:
        """Wait until a node shows `count` loaded images; their URLs."""
        return self.page.wait_for(
            f"""(() => {{ const n = app.graph.getNodeById({node_id});
                const imgs = n?.imgs ?? [];
                return imgs.length === {count} && imgs.every(i => i.complete && i.naturalWidth > 0)
                    ? imgs.map(i => i.src) : null; }})()""",
            timeout=timeout, message=f"{count} image(s) shown on node {node_id}")

    def wait_for_last_run(self, timeout: float = 30.0) -> dict:
        return self.page.wait_for(
            f"""(() => {{ const n = app.graph.nodes.find(n => n.type === {js(NODE)});
                return n?.aithrivingLastCost ? {{...n.aithrivingLastCost, text: n.aithrivingLastRun()}} : null; }})()""",
            timeout=timeout, message="the last run's cost on the Structure node")

    def select_node(self, node_id: int) -> None:
        """Click a node's title bar on the canvas."""
        point = self.page.evaluate(
            f"""(() => {{ const n = app.graph.getNodeById({node_id});
                const [x, y] = app.canvasPosToClientPos([n.pos[0] + 60, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
                return {{x, y}}; }})()""")
        self.page.click_at(point["x"], point["y"])
        self.page.wait_for(f"app.canvas.selected_nodes?.[{node_id}] !== undefined", message=f"node {node_id} selected")

    def open_help_of_selected_node(self, heading: str) -> str:
        """Click the info button of the selection toolbox; wait for a help page with this heading; its text."""
        self.page.click("document.querySelector('.selection-toolbox [data-testid=info-button]')",
                        what="the node's info button")
        return self.page.wait_for(
            f"""(() => {{ const h = [...document.querySelectorAll('h1, h2, h3')].find(h => h.textContent.trim() === {js(heading)});
                return h ? (h.closest('.sidebar-content-container') ?? document.body).innerText : null; }})()""",
            message=f"a help page with the heading {heading!r}")

    def widen_sidebar(self, width: float) -> float:
        """Drag the side panel's edge until the panel is about `width` pixels wide; its width."""
        edge = self.page.wait_for(
            """(() => { const g = document.querySelector('.p-splitter-gutter');
                if (!g) return null; const r = g.getBoundingClientRect();
                return r.height > 0 ? {x: r.x + r.width / 2, y: r.y + r.height / 2} : null; })()""",
            message="the side panel's edge")
        self.page.drag((edge["x"], edge["y"]), (width, edge["y"]))
        time.sleep(0.3)
        return self.page.evaluate("document.querySelector('.sidebar-content-container')?.getBoundingClientRect().right ?? 0")

    # -- pictures -----------------------------------------------------------------------------

    def frame_graph(self, *, left: float = 80, top: float = 150, right: float = 40, bottom: float = 40,
                    max_scale: float = 1.0) -> None:
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
            }})()""")
        time.sleep(0.4)  # two frames at least

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        return self.page.screenshot(path, clip=clip)


def save_small_png(png: bytes, path: Path) -> Path:
    """Write a screenshot as a compact PNG (256-colour palette: UI pictures lose nothing visible)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="PNG", optimize=True)
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
