// Wiring: ask for a key when the server wants one, load the models, start the playground and the dashboard.

import { AuthError, apiKey, getJSON } from "./api.js";
import { Dashboard } from "./dashboard.js";
import * as fmt from "./format.js";
import { Playground } from "./playground.js";

const $ = (id) => document.getElementById(id);
const status = $("status");

function setStatus(text, state) {
  status.textContent = text;
  status.dataset.state = state;
}

// Resolves once the user has given a key (the dialog stays until then; the header button reopens it).
let pendingKey = null;
function askKey(reason) {
  const dialog = $("key-dialog");
  const error = $("key-error");
  error.hidden = !reason;
  error.textContent = reason ?? "";
  $("key-button").hidden = false;
  setStatus("API key needed", "down");
  if (!dialog.open) dialog.showModal();
  pendingKey ??= new Promise((resolve) => {
    $("key-form").addEventListener("submit", function use() {
      const key = $("key-input").value.trim();
      if (!key) return;
      apiKey.set(key);
      $("key-input").value = "";
      $("key-form").removeEventListener("submit", use);
      pendingKey = null;
      resolve();
    });
  });
  return pendingKey;
}

async function loadModels(playground) {
  for (;;) {
    try {
      const models = await getJSON("/v1/models");
      playground.setModels(models.data.map((m) => m.id));
      const showCard = () => {
        const card = models.data.find((m) => m.id === $("model").value);
        if (!card) return;
        const replicas = card.replicas ? ` · ${card.replicas.length} replicas` : "";
        $("card").textContent = `${fmt.number(card.context_length)} ctx${replicas} · ${card.chip}`;
        $("card").title = `energy: ${card.energy_source}`;
      };
      $("model").onchange = showCard;
      showCard();
      return;
    } catch (e) {
      if (!(e instanceof AuthError)) throw e;
      await askKey("That key was refused.");
    }
  }
}

async function watchReady() {
  try {
    const response = await fetch("/ready", { cache: "no-store" });
    const body = await response.json();
    if (response.ok) setStatus("ready", "up");
    else setStatus(body.error?.code === "draining" ? "draining" : "restarting", "down");
  } catch {
    setStatus("unreachable", "down");
  }
  setTimeout(watchReady, 5000);
}

async function main() {
  let dashboard = null;
  const reauthorize = async (e) => {
    await askKey(e?.message ? `The server refused the key: ${e.message}` : undefined);
    dashboard?.start();
  };
  const playground = new Playground({ onAuthError: reauthorize });
  dashboard = new Dashboard(document.querySelector("section.live"), {
    onAuthError: reauthorize,
  });
  $("key-button").addEventListener("click", () => askKey().then(() => dashboard.start()));

  const { required } = await getJSON("/ui/auth", { auth: false });
  if (required) $("key-button").hidden = false;
  if (required && !apiKey.get()) await askKey();
  await loadModels(playground);
  dashboard.start();
  watchReady();
  $("message").focus();
}

main().catch((e) => setStatus(`error: ${e.message}`, "down"));
