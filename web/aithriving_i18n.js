// The pack's words in the user's language: every text this pack's JavaScript shows comes from here.
//
// ComfyUI serves each pack's locales/<lang>/*.json at /i18n: main.json at the top level (this pack's
// texts under "aithrivingStructure", its settings categories under "settingsCategories"),
// settings.json under "settings" (keyed by setting id with "." as "_"), nodeDefs.json under
// "nodeDefs". The frontend puts these into its own translations, and names settings and categories
// from them itself; the texts this pack draws (badges, key form, dialog, toasts, menu entry) are looked
// up here in the language of the Comfy.Locale setting, then its base language, then English.
//
// ENGLISH is the built-in fallback, used when /i18n cannot be read. It is plain JSON between the two
// marker comments: tests/test_web_translations.py reads it, checks that locales/en says the same, that
// fr and es have every key with the same {placeholders}, and that no other text in web/*.js is shown.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const NODE_ID = "AIThrivingStructure";
export const STRINGS_KEY = "aithrivingStructure";
// The settings of this pack (web/aithriving_setup.js), named by their i18n keys.
const SETTING_PREFIX = "AIThriving_";
const CATEGORIES = ["AIThriving", "Setup"];

// ENGLISH BEGIN
export const ENGLISH = {
  "aithrivingStructure": {
    "estimate": "≈ {credits} credits",
    "estimatePerImage": "≈ {credits} credits per image",
    "estimateAsLastRun": "≈ {credits} credits (as the last run)",
    "lastRun": "Last run: {credits} credits",
    "lastRunFromStore": "Last run: {credits} credits ({stored} from the result store)",
    "lastRunReused": "Last run: 0 credits (ComfyUI reused the previous result)",
    "estimateStandIn": "0 credits · stand-in · free",
    "lastRunStandIn": "Last run: 0 credits (stand-in · free)",
    "noticeNoKey": "API key not set · Settings → AIThriving",
    "noticeStandIn": "stand-in · free",
    "keyStatusAsking": "Asking the server…",
    "keyStatusError": "Could not ask the server: {error}",
    "keyStatusEnvironment": "A key is set by the AITHRIVING_API_KEY environment variable; it takes precedence over a key saved here.",
    "keyStatusSaved": "A key is saved in your key file (outside ComfyUI's folders). It is never shown again.",
    "keyStatusNoneStandIn": "No API key set. Not needed now: the free stand-in is on.",
    "keyStatusNone": "No API key set. Paste the key from your aithriving.com account and press Save.",
    "keyPlaceholder": "API key",
    "keyInputLabel": "AIThriving API key",
    "keySave": "Save",
    "keyRemove": "Remove key",
    "keySaved": "Saved. The next run uses it; no restart needed.",
    "keyRemoved": "The key file was removed.",
    "keyEmpty": "Paste the key first, then press Save.",
    "keyRefused": "The server did not take this key: paste only the key from your aithriving.com account, on one line.",
    "keyConflict": "The key cannot be kept here: the AITHRIVING_API_KEY environment variable is set, or AITHRIVING_API_KEY_FILE points into ComfyUI's folders.",
    "keyNotKept": "The server kept no usable key; paste the key again from your aithriving.com account.",
    "serverAnswered": "The server answered HTTP {status}; nothing was changed.",
    "serverUnreachable": "The ComfyUI server could not be reached.",
    "dialogTitle": "AIThriving API key",
    "dialogOffline": "Or switch on the free stand-in in Settings → AIThriving.",
    "setKeyInSettings": "Set the API key in Settings → AIThriving → API key.",
    "toastNoKeySummary": "AIThriving Structure: no API key set",
    "toastNoKeyDetail": "Set it in Settings → AIThriving → API key, or switch on the free stand-in there.",
    "toastSummary": "AIThriving",
    "menuSetKey": "AIThriving: set API key…"
  },
  "settingsCategories": {
    "AIThriving": "AIThriving",
    "Setup": "Setup"
  },
  "settings": {
    "AIThriving_Setup_APIKey": {
      "name": "API key",
      "tooltip": "Saved in your own key file (in your user's config folder, readable only by you), never in ComfyUI's settings, workflows or images."
    },
    "AIThriving_Setup_LocalStandIn": {
      "name": "Use the free stand-in (no key, no credits)",
      "tooltip": "Runs the Structure node against a stand-in inside ComfyUI: images drawn from the input's edges, coloured from the prompt; no key, no network, 0 credits. Turn off for real results."
    }
  }
};
// ENGLISH END

let strings = { en: ENGLISH[STRINGS_KEY] };
let packMessages = {}; // locale -> this pack's part of /i18n, to put back into the frontend (see below)
let restoredLocale = null;
let loading = null;

// This pack's part of one language's messages from /i18n.
function packPart(messages) {
  const mine = {};
  if (messages?.nodeDefs?.[NODE_ID]) mine.nodeDefs = { [NODE_ID]: messages.nodeDefs[NODE_ID] };
  if (messages?.[STRINGS_KEY]) mine[STRINGS_KEY] = messages[STRINGS_KEY];
  const settings = Object.entries(messages?.settings ?? {}).filter(([id]) => id.startsWith(SETTING_PREFIX));
  if (settings.length) mine.settings = Object.fromEntries(settings);
  const categories = CATEGORIES.filter((name) => messages?.settingsCategories?.[name]);
  if (categories.length) {
    mine.settingsCategories = Object.fromEntries(categories.map((name) => [name, messages.settingsCategories[name]]));
  }
  return mine;
}

/** Read the translations from /i18n once (later calls wait for the same read). */
export function loadTranslations() {
  loading ??= (async () => {
    try {
      const response = await api.fetchApi("/i18n");
      if (!response.ok) return;
      const all = await response.json();
      for (const [locale, messages] of Object.entries(all)) {
        const mine = packPart(messages);
        if (mine[STRINGS_KEY]) strings[locale] = mine[STRINGS_KEY];
        if (Object.keys(mine).length) packMessages[locale] = mine;
      }
      strings.en = { ...ENGLISH[STRINGS_KEY], ...strings.en };
    } catch (error) {
      console.warn("[aithrivingstructure] translations not loaded, showing English", error);
    }
  })();
  return loading;
}

/** The language the user chose in ComfyUI's settings (Comfy.Locale), English when it cannot be read. */
export function currentLocale() {
  try {
    return app.extensionManager?.setting?.get?.("Comfy.Locale") || "en";
  } catch {
    return "en";
  }
}

// Frontend 1.32 loses the packs' translations of a language it loads lazily (every one but English):
// it merges them from /i18n first and then replaces that language's messages with its own (fixed
// upstream in ComfyUI_frontend pull request 7214). Put this pack's part back (node names, settings,
// categories), once the frontend has loaded the language. Where the frontend keeps them, or its i18n
// cannot be reached, this does nothing.
function frontendI18n() {
  const vueApp = document.getElementById("vue-app")?.__vue_app__;
  const symbol = vueApp?.__VUE_I18N_SYMBOL__;
  return symbol ? vueApp._context?.provides?.[symbol]?.global ?? null : null;
}

function restoreTranslations(locale) {
  const i18n = frontendI18n();
  const mine = packMessages[locale];
  if (!i18n || !mine || typeof i18n.te !== "function") return true;
  if (!i18n.te("g.about", locale)) return false; // the frontend has not loaded this language yet
  const lost = (mine.nodeDefs && !i18n.te(`nodeDefs.${NODE_ID}.display_name`, locale))
    || Object.keys(mine.settings ?? {}).some((id) => !i18n.te(`settings.${id}.name`, locale));
  if (lost) i18n.mergeLocaleMessage(locale, mine);
  return true;
}

/** Wait (at most timeoutMs) until the frontend has loaded the user's language, then put our part back. */
export async function restoreTranslationsWhenLoaded(timeoutMs = 5000) {
  const locale = currentLocale();
  const deadline = Date.now() + timeoutMs;
  while (!restoreTranslations(locale) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  restoredLocale = locale;
}

/** The text of `key` in the user's language, with {name} placeholders filled from values. */
export function t(key, values = {}) {
  const locale = currentLocale();
  if (locale !== restoredLocale && restoreTranslations(locale)) restoredLocale = locale;
  const template = strings[locale]?.[key] ?? strings[locale.split("-")[0]]?.[key] ?? ENGLISH[STRINGS_KEY][key];
  return template.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

/** A setting's English name or tooltip (the frontend shows settings.json's translation instead). */
export function settingText(id, field) {
  return ENGLISH.settings[id.replaceAll(".", "_")][field];
}
