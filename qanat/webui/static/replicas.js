// Per replica, when a router serves a model over several: a table of the latest figures and two charts.
// Hidden on a server without routers.

import { LineChart } from "./chart.js";
import * as fmt from "./format.js";

const COLUMNS = [
  ["State", (r) => r.state],
  ["Running", (r) => String(r.requests_running)],
  ["Waiting", (r) => (r.requests_waiting == null ? fmt.NA : String(r.requests_waiting))],
  ["KV cache", (r) => fmt.percent(r.kv_cache_usage)],
  ["Tokens/s", (r) => fmt.number(r.tokens_per_s)],
  ["Requests/s", (r) => fmt.number(r.requests_per_s)],
  ["Failures/s", (r) => fmt.number(r.failures_per_s)],
  ["Power", (r) => fmt.watts(r.power_w)],
  ["J/token", (r) => fmt.joules(r.joules_per_token)],
];

const name = (r) => `${r.model}/${r.replica}`;

function cell(tag, text) {
  const e = document.createElement(tag);
  e.textContent = text;
  return e;
}

export class Replicas {
  constructor(root) {
    this.root = root;
    this.body = root.querySelector("tbody");
    root.querySelector("thead tr").append(...COLUMNS.map(([title]) => cell("th", title)));
    this.chartsRoot = root.querySelector(".charts");
    this.names = "";
  }

  update(samples, spanS) {
    const latest = samples[samples.length - 1]?.replicas ?? [];
    this.root.hidden = latest.length === 0;
    if (!latest.length) return;
    const names = latest.map(name);
    if (names.join("\n") !== this.names) {
      // The set of replicas changed (or first seen): charts with one series per replica.
      this.names = names.join("\n");
      this.chartsRoot.replaceChildren();
      const series = names.map((n) => ({ key: n, name: n }));
      this.charts = [
        [new LineChart(this.chartsRoot, { title: "Tokens/s by replica", format: fmt.number, series }), "tokens_per_s"],
        [new LineChart(this.chartsRoot, { title: "Running by replica", format: fmt.number, series }),
          "requests_running"],
      ];
    }
    for (const [chart, field] of this.charts) {
      chart.update(samples.map((s) => ({
        t: s.t, ...Object.fromEntries((s.replicas ?? []).map((r) => [name(r), r[field]])),
      })), spanS);
    }
    this.body.replaceChildren(...latest.map((r) => {
      const row = document.createElement("tr");
      row.append(cell("th", name(r)), ...COLUMNS.map(([, value]) => cell("td", value(r))));
      row.dataset.state = r.state === "ready" ? "up" : "down";
      return row;
    }));
  }
}
