// The chat playground: a conversation with the model over /v1/chat/completions, streamed.
// Every piece of user text and model output goes into the page as a text node, never as HTML.

import { AuthError, streamChat } from "./api.js";
import * as fmt from "./format.js";

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text != null) e.textContent = text;
  return e;
}

function numberOrNull(input) {
  return input.value.trim() === "" ? null : Number(input.value);
}

export class Playground {
  constructor({ onAuthError }) {
    this.onAuthError = onAuthError;
    this.messages = []; // the conversation as sent to the server: {role, content}, system prompt excluded
    this.conversation = 0; // bumped by "New chat", so a reply still streaming then stays out of the new one
    this.controller = null;
    this.el = {
      model: $("model"), system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"),
      json: $("json-mode"), topP: $("top-p"), seed: $("seed"), extra: $("extra"),
      log: $("conversation"), message: $("message"), send: $("send"), stop: $("stop"), clear: $("clear"),
    };
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    this.el.message.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    });
    this.el.stop.addEventListener("click", () => this.controller?.abort());
    this.el.clear.addEventListener("click", () => this.clear());
    this.el.extra.addEventListener("input", () => this.el.extra.setCustomValidity(""));
  }

  setModels(ids) {
    const select = this.el.model;
    const previous = select.value;
    select.replaceChildren(...ids.map((id) => element("option", null, id)));
    if (ids.includes(previous)) select.value = previous;
  }

  clear() {
    this.controller?.abort();
    this.conversation += 1;
    this.messages = [];
    this.el.log.replaceChildren(element("p", "empty", "A new conversation."));
  }

  // The request body: the settings, then "Extra parameters (JSON)" over them. null if that JSON is invalid.
  body() {
    const body = {
      model: this.el.model.value,
      messages: [],
      stream: true,
      stream_options: { include_usage: true },
    };
    const system = this.el.system.value.trim();
    if (system) body.messages.push({ role: "system", content: system });
    body.messages.push(...this.messages);
    const temperature = numberOrNull(this.el.temperature);
    const maxTokens = numberOrNull(this.el.maxTokens);
    const topP = numberOrNull(this.el.topP);
    const seed = numberOrNull(this.el.seed);
    if (temperature != null) body.temperature = temperature;
    if (maxTokens != null) body.max_tokens = maxTokens;
    if (topP != null) body.top_p = topP;
    if (seed != null) body.seed = seed;
    if (this.el.json.checked) body.response_format = { type: "json_object" };
    const extra = this.el.extra.value.trim();
    if (extra) {
      let parsed;
      try {
        parsed = JSON.parse(extra);
      } catch (e) {
        parsed = e;
      }
      if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed) || parsed instanceof Error) {
        this.el.extra.setCustomValidity("a JSON object, such as {\"top_k\": 40}");
        this.el.extra.closest("details").open = true;
        this.el.extra.closest("details.settings").open = true;
        this.el.extra.reportValidity();
        return null;
      }
      Object.assign(body, parsed);
    }
    return body;
  }

  turn(role, text) {
    this.el.log.querySelector(".empty")?.remove();
    const article = element("article", `turn ${role}`);
    article.setAttribute("aria-label", role === "user" ? "You" : "Model");
    const bubble = element("div", "bubble");
    const content = document.createTextNode(text);
    bubble.append(content);
    article.append(bubble);
    this.el.log.append(article);
    return { article, bubble, content };
  }

  scroll(follow) {
    if (follow) this.el.log.scrollTop = this.el.log.scrollHeight;
  }

  atBottom() {
    const log = this.el.log;
    return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  }

  busy(on) {
    this.el.send.disabled = on;
    this.el.stop.disabled = !on;
    this.el.log.setAttribute("aria-busy", String(on));
  }

  async send() {
    const text = this.el.message.value.trim();
    if (!text || this.controller) return;
    this.messages.push({ role: "user", content: text });
    const body = this.body();
    if (!body) {
      this.messages.pop();
      return;
    }
    this.el.message.value = "";
    this.turn("user", text);
    const reply = this.turn("assistant", "");
    reply.article.classList.add("streaming");
    this.scroll(true);

    const controller = new AbortController();
    const conversation = this.conversation;
    this.controller = controller;
    this.busy(true);
    const started = performance.now();
    const run = { first: null, last: null, chunks: 0, usage: null, finish: null, error: null, stopped: false };
    try {
      await streamChat(body, controller.signal, (chunk) => {
        const now = performance.now();
        if (chunk.usage) run.usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (!choice) return;
        run.first ??= now;
        const piece = choice.delta?.content;
        if (piece) {
          const follow = this.atBottom();
          reply.content.appendData(piece);
          run.chunks += 1;
          run.last = now;
          this.scroll(follow);
        }
        if (choice.finish_reason) run.finish = choice.finish_reason;
      });
    } catch (e) {
      if (e.name === "AbortError") run.stopped = true;
      else run.error = e;
    } finally {
      this.controller = null;
      this.busy(false);
      reply.article.classList.remove("streaming");
    }
    if (conversation !== this.conversation) return;
    const content = reply.content.data;
    // A stopped or failed reply stays in the conversation as far as it got, as in any chat.
    if (content) this.messages.push({ role: "assistant", content });
    if (run.error && !content) reply.bubble.remove(); // refused before any token: the error says it all
    else reply.article.append(this.stats(run, started));
    if (run.error) {
      const error = element("p", "error", run.error.message);
      error.setAttribute("role", "alert");
      reply.article.append(error);
      if (!content) this.messages.pop(); // the user's message: an unanswered turn would confuse the next one
      if (run.error instanceof AuthError) this.onAuthError(run.error);
    }
    this.scroll(true);
  }

  stats(run, started) {
    const line = element("p", "stats");
    const add = (key, text, title) => {
      const item = element("span", null, text);
      item.dataset.stat = key;
      if (title) item.title = title;
      line.append(item);
    };
    const u = run.usage;
    const ttft = run.first == null ? null : (run.first - started) / 1000;
    if (u) {
      const n = u.completion_tokens;
      // Decode speed: tokens after the first, over the time since it came.
      const span = run.last != null && run.first != null ? (run.last - run.first) / 1000 : 0;
      const rate = n > 1 && span > 0 ? (n - 1) / span : null;
      add("tokens", `${n} tokens`, `${u.prompt_tokens} prompt tokens in`);
      add("speed", `${fmt.number(rate)} tok/s`);
      add("ttft", `TTFT ${fmt.seconds(ttft)}`, "time to first token, as this page saw it");
      add("cached", `${u.prompt_tokens_details?.cached_tokens ?? fmt.NA} cached`,
        "prompt tokens reused from the server's prefix cache");
      const source = u.energy_source ?? "";
      add("energy", `${fmt.joules(u.energy_joules)} (${source || "no meter"})`, fmt.energySourceHelp(source));
      if (run.finish === "length") add("finish", "cut at max tokens");
    } else {
      if (run.stopped) add("finish", "stopped");
      add("tokens", `${run.chunks} tokens streamed`);
      add("ttft", `TTFT ${fmt.seconds(ttft)}`);
      add("energy", `energy ${fmt.NA}`, "the server reports energy with a finished reply's usage");
    }
    return line;
  }
}
