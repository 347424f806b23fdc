// Set-up of the "Structure (AIThriving)" pack from ComfyUI itself: no terminal needed.
//
//   Settings → AIThriving → API key   whether a key is set and where it comes from (GET /aithriving/key),
//                                      a password field that posts the key (POST /aithriving/key) and a
//                                      button that removes the key file (DELETE). Write-only: the key is
//                                      never read back, never kept in the settings, the workflow or a PNG.
//   Settings → AIThriving → Offline   "Use the free stand-in (no key, no credits)", kept by the
//                                      server next to the key file (GET/POST /aithriving/mode).
//   On each Structure node            a notice badge: "API key not set · Settings → AIThriving" when no
//                                      key is set and offline mode is off; "stand-in · free" when on.
//   At start-up                       a toast saying the same when no key is set and offline mode is off.
// The node's right-click menu opens a small key dialog too: through the frontend's getNodeMenuItems hook
// where it has one (frontends since late 2025), else by extending the node's getExtraMenuOptions.
// Every text shown is in the user's language (web/aithriving_i18n.js, locales/<lang>/).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { NODE_ID, currentLocale, loadTranslations, settingText, t } from "./aithriving_i18n.js";

const KEY_SETTING = "AIThriving.Setup.APIKey";
// The setting id keeps its first name: ComfyUI keeps each user's value under it.
const OFFLINE_SETTING = "AIThriving.Setup.LocalStandIn";

// What the server last said. The cost badges (web/aithriving_structure.js) import it for offline mode;
// other code in the page reads it as this extension's `state` (app.extensions): no page global.
const state = { key: null, offline: null, error: null };
export const setupState = state;
const listeners = new Set();
let noKeyToast = null; // the start-up toast, taken away once a key is set or offline mode is on

function changed() {
  for (const listener of listeners) listener();
  if (noKeyToast && (state.key?.set || state.offline)) {
    try {
      app.extensionManager?.toast?.remove?.(noKeyToast);
    } catch (error) {
      console.warn("[aithriving.setup] could not take the toast away", error);
    }
    noKeyToast = null;
  }
  for (const node of app.graph?.nodes ?? []) {
    if ((node.comfyClass ?? node.type) === NODE_ID) {
      node.setDirtyCanvas?.(true, true);
      node.graph?.trigger?.("node:slot-errors:changed", { nodeId: node.id });
    }
  }
}

// A refusal in the user's words. The server words its refusals in English, precisely: an English page
// shows them as they are; other languages show what the HTTP status means (and the console the rest).
function refusalText(status, serverWords) {
  if (serverWords && currentLocale().split("-")[0] === "en") return serverWords;
  if (serverWords) console.info("[aithriving.setup] the server said:", serverWords);
  if (status === 400) return t("keyRefused");
  if (status === 409) return t("keyConflict");
  return t("serverAnswered", { status });
}

async function answerOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) throw new Error(refusalText(response.status, body?.error));
  return body;
}

// What went wrong, for the page: a refusal as answerOf words it, a failed request in the user's words.
function problemText(error) {
  if (error instanceof TypeError) return t("serverUnreachable"); // fetch: no answer at all
  return String(error?.message ?? error);
}

async function refresh() {
  try {
    const [key, mode] = await Promise.all([
      api.fetchApi("/aithriving/key").then(answerOf),
      api.fetchApi("/aithriving/mode").then(answerOf),
    ]);
    state.key = key;
    state.offline = mode.offline === true;
    state.error = null;
  } catch (error) {
    state.error = problemText(error);
  }
  changed();
}

async function sendKey(key) {
  const response = await api.fetchApi("/aithriving/key", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key }),
  });
  state.key = await answerOf(response);
  changed();
  // A refused key is a 400 whose sentence answerOf throws; an answer still without a key is not "Saved".
  if (!state.key?.set) {
    throw new Error(t("keyNotKept"));
  }
}

async function removeKey() {
  const response = await api.fetchApi("/aithriving/key", { method: "DELETE" });
  state.key = await answerOf(response);
  changed();
}

async function sendMode(offline) {
  const response = await api.fetchApi("/aithriving/mode", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ offline }),
  });
  state.offline = (await answerOf(response)).offline === true;
  changed();
}

function keyStatusText() {
  if (state.error) return t("keyStatusError", { error: state.error });
  const key = state.key;
  if (!key) return t("keyStatusAsking");
  if (key.source === "environment") return t("keyStatusEnvironment");
  if (key.set) return t("keyStatusSaved");
  return t(state.offline ? "keyStatusNoneStandIn" : "keyStatusNone");
}

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

// The key form, shared by the settings panel and the dialog. The typed key goes straight to the server;
// the setting's own value is never touched, so the frontend never stores it.
function keyForm(onSaved) {
  const status = element("div", { className: "aithriving-key-status" });
  status.style.cssText = "margin-bottom:6px;white-space:normal;";
  const message = element("div", { className: "aithriving-key-message" });
  message.style.cssText = "margin-top:6px;white-space:normal;";
  const input = element("input", {
    type: "password", autocomplete: "off", spellcheck: false, placeholder: t("keyPlaceholder"),
    className: "aithriving-key-input p-inputtext",
  });
  input.setAttribute("aria-label", t("keyInputLabel"));
  input.style.cssText = "width:16em;margin-right:6px;";
  const save = element("button", {
    type: "button", textContent: t("keySave"), className: "aithriving-key-save p-button",
  });
  const remove = element("button", {
    type: "button", textContent: t("keyRemove"),
    className: "aithriving-key-remove p-button p-button-secondary",
  });
  save.style.cssText = remove.style.cssText = "margin-right:6px;padding:2px 10px;";
  const render = () => {
    status.textContent = keyStatusText();
    const fromEnvironment = state.key?.source === "environment";
    input.disabled = save.disabled = fromEnvironment;
    remove.disabled = fromEnvironment || !state.key?.set;
  };
  const run = async (action, done) => {
    message.textContent = "";
    try {
      await action();
      message.textContent = done;
      onSaved?.();
    } catch (error) {
      message.textContent = problemText(error);
    }
    render();
  };
  save.addEventListener("click", () => {
    if (!input.value.trim()) {
      message.textContent = t("keyEmpty");
      return;
    }
    run(async () => {
      const key = input.value;
      input.value = ""; // not kept in the page longer than the request
      await sendKey(key);
    }, t("keySaved"));
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") save.click();
  });
  remove.addEventListener("click", () => run(removeKey, t("keyRemoved")));
  listeners.add(render);
  render();
  const form = element("div", { className: "aithriving-key-form" }, [status, input, save, remove, message]);
  form.dispose = () => listeners.delete(render);
  return form;
}

// The key dialog is the frontend's own (app.extensionManager.dialog, frontends 1.25 and later): the pack
// adds nothing to the page's document itself. Its content is a Vue component with no template of its own:
// it renders a placeholder and puts the key form beside it, inside the dialog the frontend made for it.
// Already "extension-" prefixed: the frontend files it under that, and its closeDialog() looks up the key as given.
const KEY_DIALOG = "extension-aithriving-key";

function keyDialogComponent(close) {
  let content = null;
  let form = null;
  return {
    name: "AIThrivingKeyDialog",
    props: { maximized: Boolean }, // passed to every dialog's content
    render: () => null,
    mounted() {
      form = keyForm(() => setTimeout(close, 800));
      content = element("div", { className: "aithriving-key-dialog" }, [
        form,
        element("p", { textContent: t("dialogOffline") }),
      ]);
      content.style.cssText = "max-width:32em;";
      this.$el.parentNode.insertBefore(content, this.$el);
      content.querySelector("input")?.focus();
    },
    unmounted() {
      form?.dispose();
      content?.remove();
    },
  };
}

function openKeyDialog() {
  const dialogs = app.extensionManager?.dialog;
  if (!dialogs?.showExtensionDialog) {
    app.extensionManager?.toast?.add?.({
      severity: "info", summary: t("toastSummary"), detail: t("setKeyInSettings"), life: 8000,
    });
    return;
  }
  const opened = dialogs.showExtensionDialog({
    key: KEY_DIALOG, title: t("dialogTitle"), component: keyDialogComponent(() => opened?.closeDialog()),
  });
}

function noticeText() {
  if (state.offline) return t("noticeStandIn");
  if (state.key && !state.key.set) return t("noticeNoKey");
  return "";
}

// The node's menu entry that opens the key dialog.
function keyMenuItem() {
  return { content: t("menuSetKey"), callback: () => openKeyDialog() };
}

// Frontends with the getNodeMenuItems hook (1.3x and later) collect extensions' node menu entries
// through app.collectNodeMenuItems; older ones only call the node's getExtraMenuOptions.
function frontendHasNodeMenuItems() {
  return typeof app.collectNodeMenuItems === "function";
}

function noticeBadge(node) {
  const text = noticeText();
  return new window.LGraphBadge({
    text, fgColor: "#ffffff", bgColor: state.offline ? "#2F5D7C" : "#9B3B2F",
  });
}

app.registerExtension({
  name: "aithrivingstructure.setup",
  state,
  openKeyDialog,

  settings: [
    {
      id: KEY_SETTING,
      category: ["AIThriving", "Setup", "APIKey"],
      // The frontend shows settings.json's translations of name and tooltip (locales/<lang>/).
      name: settingText(KEY_SETTING, "name"),
      tooltip: settingText(KEY_SETTING, "tooltip"),
      // A custom element: the key is posted to the server and this setting's value stays empty.
      type: () => keyForm(),
      defaultValue: "",
    },
    {
      id: OFFLINE_SETTING,
      category: ["AIThriving", "Setup", "Offline"],
      name: settingText(OFFLINE_SETTING, "name"),
      tooltip: settingText(OFFLINE_SETTING, "tooltip"),
      type: "boolean",
      defaultValue: false,
      onChange: async (value) => {
        // The server's settings file is the truth; this setting only mirrors it.
        if (state.offline === null || value === state.offline) return;
        try {
          await sendMode(value === true);
        } catch (error) {
          app.extensionManager?.toast?.add?.({
            severity: "error", summary: t("toastSummary"), detail: problemText(error), life: 8000,
          });
        }
      },
    },
  ],

  async setup() {
    await Promise.all([loadTranslations(), refresh()]);
    const setting = app.extensionManager?.setting;
    if (state.offline !== null && setting?.get?.(OFFLINE_SETTING) !== state.offline) {
      try {
        await setting.set(OFFLINE_SETTING, state.offline);
      } catch (error) {
        console.warn("[aithriving.setup] could not mirror the offline mode into the settings", error);
      }
    }
    if (state.key && !state.key.set && !state.offline) {
      noKeyToast = {
        severity: "warn", summary: t("toastNoKeySummary"), detail: t("toastNoKeyDetail"), life: 12000,
      };
      app.extensionManager?.toast?.add?.(noKeyToast);
    }
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.aithrivingNotice = () => noticeText();
      this.badges = this.badges ?? [];
      this.badges.push(() => noticeBadge(this));
      return result;
    };
    if (frontendHasNodeMenuItems()) return; // the entry comes from getNodeMenuItems below
    const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const result = getExtraMenuOptions?.apply(this, arguments);
      options?.push?.(keyMenuItem());
      return result;
    };
  },

  // The frontend's node menu hook: entries for the node right-clicked (frontends that lack it never call it).
  getNodeMenuItems(node) {
    const type = node?.constructor?.comfyClass ?? node?.comfyClass ?? node?.type;
    return type === NODE_ID ? [keyMenuItem()] : [];
  },
});
