// The live dashboard: polls /metrics/live once a second while the page is visible, and shows the latest
// sample as figures and the last minutes as charts. The server computes every figure (the same numbers as
// /metrics); the page only draws them.

import { AuthError, getJSON } from "./api.js";
import { LineChart } from "./chart.js";
import * as fmt from "./format.js";
import { Replicas } from "./replicas.js";

const POLL_MS = 1000;

const CHARTS = [
  { title: "Tokens/s", format: fmt.number,
    series: [{ key: "generation_tokens_per_s", name: "generated" }, { key: "prompt_tokens_per_s", name: "prompt" }] },
  { title: "Time to first token", format: fmt.seconds,
    series: [{ key: "ttft_p50_s", name: "p50" }, { key: "ttft_p99_s", name: "p99" }] },
  { title: "Inter-token latency", format: fmt.seconds,
    series: [{ key: "itl_p50_s", name: "p50" }, { key: "itl_p99_s", name: "p99" }] },
  { title: "Requests", format: fmt.number,
    series: [{ key: "requests_running", name: "running" }, { key: "requests_waiting", name: "waiting" }] },
  { title: "KV cache", format: fmt.percent, fixedMax: 1, series: [{ key: "kv_cache_usage", name: "used" }] },
  { title: "Prefix cache", format: fmt.percent, fixedMax: 1,
    series: [{ key: "prefix_cache_hit_ratio", name: "prompt tokens reused" }] },
  { title: "Power", format: fmt.watts, series: [{ key: "power_w", name: "charged to requests" }] },
  { title: "Energy per token", format: fmt.joules, series: [{ key: "joules_per_token", name: "J / token" }] },
];

export class Dashboard {
  constructor(root, { onAuthError }) {
    this.root = root;
    this.onAuthError = onAuthError;
    this.samples = [];
    this.seq = 0;
    this.timer = null;
    this.running = false;
    this.note = root.querySelector("#live-note");
    this.figures = Object.fromEntries([...root.querySelectorAll("[data-figure]")].map((e) => [e.dataset.figure, e]));
    this.subs = Object.fromEntries([...root.querySelectorAll("[data-sub]")].map((e) => [e.dataset.sub, e]));
    this.span = root.querySelector("#span");
    this.span.addEventListener("change", () => this.redraw());
    const charts = root.querySelector("#charts");
    this.charts = CHARTS.map((spec) => new LineChart(charts, spec));
    this.replicas = new Replicas(root.querySelector("#replicas"));
    document.addEventListener("visibilitychange", () => this.schedule(0));
  }

  start() {
    this.running = true;
    this.schedule(0);
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
  }

  // One poll in flight at most; none while the tab is hidden (the server keeps sampling: the charts fill in
  // when the page comes back).
  schedule(delayMs) {
    clearTimeout(this.timer);
    if (!this.running) return;
    if (document.visibilityState !== "visible") {
      this.note.textContent = "paused while the page is hidden";
      return;
    }
    this.timer = setTimeout(() => this.poll(), delayMs);
  }

  async poll() {
    try {
      const data = await getJSON(`/metrics/live?after=${this.seq}`);
      this.energySource = data.energy_source;
      this.absorb(data);
      this.note.textContent = `every ${data.interval_s} s · rates over ${data.rate_window_s} s`
        + ` · quantiles over ${data.window_s} s · energy ${data.energy_source}`;
      this.note.title = fmt.energySourceHelp(data.energy_source);
    } catch (e) {
      if (e instanceof AuthError) {
        this.stop();
        this.onAuthError(e);
        return;
      }
      this.note.textContent = `no data: ${e.message}`;
    }
    this.schedule(POLL_MS);
  }

  absorb(data) {
    const fresh = data.samples;
    // A restarted server numbers its samples from 1 again.
    if (fresh.length && fresh[0].seq <= this.seq) this.samples = [];
    this.samples.push(...fresh);
    if (fresh.length) this.seq = fresh[fresh.length - 1].seq;
    this.keptS = data.capacity * data.interval_s;
    const last = this.samples[this.samples.length - 1];
    if (last) this.samples = this.samples.filter((s) => s.t > last.t - this.keptS);
    this.redraw();
    this.show(last);
  }

  redraw() {
    const spanS = Math.min(Number(this.span.value), this.keptS ?? Infinity);
    for (const chart of this.charts) chart.update(this.samples, spanS);
    this.replicas.update(this.samples, spanS);
  }

  show(s) {
    const set = (name, value, sub = "") => {
      this.figures[name].textContent = value;
      this.subs[name].textContent = sub;
    };
    if (!s) return;
    set("tps", fmt.number(s.generation_tokens_per_s), `prompt ${fmt.number(s.prompt_tokens_per_s)}/s`);
    set("ttft", fmt.seconds(s.ttft_p50_s), `p99 ${fmt.seconds(s.ttft_p99_s)}`);
    set("itl", fmt.seconds(s.itl_p50_s), `p99 ${fmt.seconds(s.itl_p99_s)}`);
    set("queue", `${s.requests_running} running · ${s.requests_waiting} waiting`, "requests holding a KV slot · queued");
    set("kv", fmt.percent(s.kv_cache_usage), `prefix hits ${fmt.percent(s.prefix_cache_hit_ratio)}`);
    set("power", fmt.watts(s.power_w), this.energySource ?? "");
    set("jpt", fmt.joules(s.joules_per_token), "per token processed");
    this.subs.power.title = fmt.energySourceHelp(this.energySource);
  }
}
