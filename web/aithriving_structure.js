// Cost on the "Structure (AIThriving)" node: what a run will cost, and what the last run did cost.
//
// Two badges above the node, drawn like the frontend's own partner-node price badges:
//   before a run  "≈ 24 credits"           credits per image times the batch size, when the graph
//                                          upstream tells it (LoadImage, RepeatImageBatch, ...);
//                 "≈ N credits per image"  when it does not (N from the node's schema: see below);
//   after a run   "Last run: 24 credits"   from the node's UI output `aithriving_cost` (sent by the
//                                          server with the "executed" message), "(k from the result store)" added
//                                          when images came from the result store and were not paid;
//                 "Last run: 0 credits (ComfyUI reused the previous result)" when ComfyUI did not run
//                                          the node at all (unchanged inputs) and re-sent its old output.
// The texts come from the pack's locales/<lang>/main.json (served by ComfyUI at /i18n), in the
// language chosen in the settings (Comfy.Locale), with English built in as the fallback.
//
// Redrawing: the classic canvas redraws on setDirtyCanvas. The "Nodes 2.0" (HTML) renderer keeps a
// reactive copy of each node and redraws it on a change it can see, which differs by frontend:
//   1.55 and later  node state: the last run is kept with LiteGraph's own setProperty (and left out of
//                   saved workflows by onSerialize);
//   1.40 to 1.52    the node's list of badges, read once into reactive state: it sees a change of
//                   that list made through Vue's reactivity only (see replaceLastRunBadge);
//   1.31 to 1.37    LiteGraph's report of a change of the node's slots, on which it re-reads the node;
// each is done where the frontend has what it needs; the others change nothing there.
// Tested on one frontend per three minor versions from 1.25 to the newest (tests/browser, the frontend
// sweep); anything missing is skipped, never thrown.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { setupState } from "./aithriving_setup.js";
import { NODE_ID, loadTranslations, restoreTranslationsWhenLoaded, t as text } from "./aithriving_i18n.js";

// Node state key of the last run's cost (never saved with the workflow: see onSerialize).
const LAST_RUN_PROPERTY = "aithriving_last_run";
// Credits per image, from the server (structure_api/contract.py, in the node's schema): see creditsPerImage.
let CREDITS_PER_IMAGE = null;

// Nodes whose IMAGE output has as many images as their first IMAGE input.
const SAME_BATCH_SIZE = new Set([
  NODE_ID, "ImageScale", "ImageScaleBy", "ImageScaleToTotalPixels", "ImageScaleToMaxDimension",
  "ImageInvert", "ImageSharpen", "ImageBlur", "ImageQuantize", "ImageBlend", "Canny", "ImageCrop",
  "ImagePadForOutpaint", "ImageFlip", "ImageRotate", "ImageUpscaleWithModel", "ImageCompositeMasked",
  "RebatchImages", "Reroute",
]);
const SINGLE_IMAGE_FILE = /\.(png|jpe?g|bmp)$/i;
const MODE_MUTED = 2;
const MODE_BYPASSED = 4;
const MAX_DEPTH = 32;

// Nodes whose output ComfyUI took from its own cache in the current run: it re-sends their last UI
// output (the old cost) without running them, so nothing was paid.
let reusedByComfy = new Set();

// The price the server states in the node's schema (the image input's `credits_per_image`), so this file
// never restates it. nodeData is the frontend's copy of /object_info; a frontend that drops unknown
// options from it gets the server's own answer.
async function creditsPerImage(nodeData) {
  const fromDefinition = nodeData?.input?.required?.image?.[1]?.credits_per_image;
  if (Number.isFinite(fromDefinition)) return fromDefinition;
  try {
    const response = await api.fetchApi(`/object_info/${NODE_ID}`);
    const definition = response.ok ? (await response.json())?.[NODE_ID] : null;
    const value = definition?.input?.required?.image?.[1]?.credits_per_image;
    if (Number.isFinite(value)) return value;
  } catch (error) {
    console.warn("[aithrivingstructure] price not loaded from the node's schema", error);
  }
  return null;
}

function inputConnected(node, index) {
  if (index < 0) return false;
  if (typeof node.isInputConnected === "function") return node.isInputConnected(index);
  return node.getInputLink?.(index) != null;
}

function widgetValue(node, name) {
  const index = node.inputs?.findIndex((slot) => slot.name === name) ?? -1;
  if (inputConnected(node, index)) return null; // converted to an input: its value comes from elsewhere
  const value = node.widgets?.find((widget) => widget.name === name)?.value;
  return Number.isFinite(value) ? value : null;
}

function imageInputIndex(node, name) {
  if (!node.inputs) return -1;
  if (name) return node.inputs.findIndex((slot) => slot.name === name);
  return node.inputs.findIndex((slot) => slot.type === "IMAGE");
}

// How many images flow into `node`'s input `index`, or null when the graph does not say.
function imagesInto(node, index, depth = 0) {
  if (index < 0 || depth > MAX_DEPTH) return null;
  const link = node.getInputLink?.(index);
  if (!link) return null;
  const origin = node.graph?.getNodeById?.(link.origin_id);
  return origin ? imagesOutOf(origin, depth + 1) : null;
}

function imagesOutOf(node, depth) {
  if (node.mode === MODE_MUTED) return null;
  const type = node.comfyClass ?? node.type;
  if (node.mode === MODE_BYPASSED || SAME_BATCH_SIZE.has(type)) {
    return imagesInto(node, imageInputIndex(node), depth);
  }
  switch (type) {
    case "LoadImage": {
      const file = node.widgets?.find((widget) => widget.name === "image")?.value;
      return typeof file === "string" && SINGLE_IMAGE_FILE.test(file) ? 1 : null;
    }
    case "EmptyImage":
      return widgetValue(node, "batch_size");
    case "RepeatImageBatch": {
      const amount = widgetValue(node, "amount");
      const each = imagesInto(node, imageInputIndex(node, "image"), depth);
      return amount != null && each != null ? amount * each : null;
    }
    case "ImageBatch": {
      const first = imagesInto(node, imageInputIndex(node, "image1"), depth);
      const second = imagesInto(node, imageInputIndex(node, "image2"), depth);
      return first != null && second != null ? first + second : null;
    }
    case "ImageFromBatch": {
      const length = widgetValue(node, "length");
      const start = widgetValue(node, "batch_index");
      const total = imagesInto(node, imageInputIndex(node, "image"), depth);
      return length != null && start != null && total != null
        ? Math.max(0, Math.min(length, total - start)) : null;
    }
    default:
      return null;
  }
}

function estimateText(node) {
  // Offline mode (web/aithriving_setup.js keeps the server's word): the in-process stand-in charges nothing.
  if (setupState.offline) return text("estimateStandIn", {});
  // The last run was answered by a free stand-in (`serve` at AITHRIVING_BASE_URL): so is the next one.
  if (node.aithrivingLastCost?.free && !node.aithrivingLastCost.reused) return text("estimateStandIn", {});
  const images = imagesInto(node, imageInputIndex(node, "image"));
  if (images != null) return text("estimate", { credits: images * CREDITS_PER_IMAGE, images });
  const last = lastCost(node);
  if (last && Number.isFinite(last.images)) {
    return text("estimateAsLastRun", { credits: last.images * CREDITS_PER_IMAGE, images: last.images });
  }
  return text("estimatePerImage", { credits: CREDITS_PER_IMAGE });
}

function lastRunText(node) {
  const cost = lastCost(node);
  if (!cost) return "";
  if (cost.reused) return text("lastRunReused", {});
  if (cost.offline || cost.free) return text("lastRunStandIn", {});
  const values = { credits: cost.credits, images: cost.images, stored: cost.from_store };
  return text(cost.from_store > 0 ? "lastRunFromStore" : "lastRun", values);
}

// cost: the node's UI output `aithriving_cost[0]`, or null when ComfyUI reused the node's last output
// (then the old cost it re-sends, if any, was not spent again).
function recordCost(node, cost) {
  const reused = cost === null || reusedByComfy.has(String(node.id));
  const previous = node.aithrivingLastCost;
  node.aithrivingLastCost = reused
    ? { credits: 0, images: previous?.images ?? cost?.images ?? null, from_store: 0, seeds: previous?.seeds ?? [], reused }
    : { credits: cost.credits, images: cost.images, from_store: cost.from_store ?? 0, seeds: cost.seeds ?? [], reused,
        offline: cost.offline === true, free: cost.free === true };
  node.aithrivingRuns = (node.aithrivingRuns ?? 0) + 1;
  // Node state: what the Nodes 2.0 renderer of newer frontends redraws the badges from.
  node.setProperty?.(LAST_RUN_PROPERTY, { ...node.aithrivingLastCost, run: node.aithrivingRuns });
  node.setDirtyCanvas?.(true, true);
  redrawInNodes2(node);
}

// Has the Nodes 2.0 renderer of 1.31 to 1.52 re-read the node (see the header; 1.55 on follows setProperty).
function redrawInNodes2(node) {
  replaceLastRunBadge(node);
  if (typeof node.graph?.trigger === "function") node.graph.trigger("node:slot-errors:changed", { nodeId: node.id });
}

// Frontends 1.40 to 1.52 draw a node's badges from a reactive view of its `badges` list, taken when
// the node is first drawn, and redraw them only when that list changes through the view. No public
// call hands an extension that view, but the frontend's workspace store (app.extensionManager, a
// reactive Pinia store) hands back the reactive view of any list put into it: the last-run badge is
// replaced through it by a fresh one, which the renderer then calls. Where the store is not reactive,
// the list itself gets the fresh badge, which changes nothing.
const VIEW_KEY = "__aithrivingBadgesView";

function replaceLastRunBadge(node) {
  const badges = node.badges;
  const index = Array.isArray(badges) ? badges.indexOf(node.aithrivingLastRunBadge) : -1;
  if (index < 0) return;
  const store = app.extensionManager;
  let view = badges;
  if (store && typeof store === "object") {
    try {
      store[VIEW_KEY] = badges;
      view = store[VIEW_KEY] ?? badges;
    } catch {
      view = badges;
    } finally {
      try {
        delete store[VIEW_KEY];
      } catch {
        // a store that refused the key has nothing to remove
      }
    }
  }
  node.aithrivingLastRunBadge = lastRunBadgeOf(node);
  view[index] = node.aithrivingLastRunBadge;
}

function lastRunBadgeOf(node) {
  const lastRun = makeBadge(lastRunText, false);
  return () => lastRun.call(node);
}

// A node the user adds starts with seed 0 and "control after generate" on "fixed" (the frontend's own
// default is "randomize"): seed 0 already asks the service for a new random image on every run, and a
// re-queue after a failure must be the same request, so that it gets what was already paid. A workflow
// being loaded sets its saved values after this, so only new nodes are affected.
function startSeedFixed(node) {
  const control = node.widgets?.find((widget) => widget.name === "control_after_generate");
  const seed = node.widgets?.find((widget) => widget.name === "seed");
  if (!control || !Array.isArray(control.options?.values) || !control.options.values.includes("fixed")) return;
  control.value = "fixed";
  if (seed && seed.value !== 0) seed.value = 0;
}

// The last run's cost: read through node state, so a renderer that tracks node state sees it change.
function lastCost(node) {
  return node.properties?.[LAST_RUN_PROPERTY] ?? node.aithrivingLastCost ?? null;
}

// The look of the frontend's partner-node price badge (coin icon on gold); the last-run badge has no
// coin, so a subgraph holding this node shows only the estimate as its price.
function makeBadge(textOf, withCoin) {
  const Badge = window.LGraphBadge;
  return function badge() {
    return new Badge({
      text: textOf(this),
      fgColor: "#ffffff",
      bgColor: withCoin ? "#8D6932" : "#3F5B3A",
      ...(withCoin ? {
        iconOptions: { unicode: "\ue96b", fontFamily: "PrimeIcons", color: "#FABC25", bgColor: "#654020", fontSize: 8 },
      } : {}),
    });
  };
}

app.registerExtension({
  name: "aithrivingstructure.node",

  // Before the node types are registered: they take their translated names then.
  async init() {
    await loadTranslations();
    await restoreTranslationsWhenLoaded();
  },

  setup() {
    api.addEventListener("execution_start", () => {
      reusedByComfy = new Set();
    });
    api.addEventListener("execution_cached", (event) => {
      reusedByComfy = new Set((event.detail?.nodes ?? []).map(String));
      // ComfyUI sends no "executed" for a cached node that nothing downstream needs re-run.
      for (const node of app.graph?.nodes ?? []) {
        if ((node.comfyClass ?? node.type) === NODE_ID && reusedByComfy.has(String(node.id))) {
          recordCost(node, null);
        }
      }
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    CREDITS_PER_IMAGE = await creditsPerImage(nodeData);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.aithrivingLastCost = null;
      startSeedFixed(this);
      this.aithrivingEstimate = () => estimateText(this);
      this.aithrivingLastRun = () => lastRunText(this);
      const estimate = makeBadge(estimateText, true);
      this.aithrivingLastRunBadge = lastRunBadgeOf(this);
      this.badges = this.badges ?? [];
      this.badges.push(() => estimate.call(this), this.aithrivingLastRunBadge);
      return result;
    };

    // The last run's cost is this page's news, not part of the workflow: saved workflows, copies and the
    // metadata of saved images leave it out (and a run does not mark the workflow as changed).
    const onSerialize = nodeType.prototype.onSerialize;
    nodeType.prototype.onSerialize = function (data) {
      const result = onSerialize?.apply(this, arguments);
      if (data?.properties && LAST_RUN_PROPERTY in data.properties) {
        data.properties = { ...data.properties };
        delete data.properties[LAST_RUN_PROPERTY];
      }
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const cost = output?.aithriving_cost?.[0];
      if (cost && Number.isFinite(cost.credits)) recordCost(this, cost);
      return result;
    };
  },
});
