// A small live line chart on a plain canvas: time on x (the last minutes), one or two series, gaps where a
// figure did not exist. Hovering shows the values at that second in the legend.

const PAD = { left: 48, right: 8, top: 8, bottom: 18 };

function niceCeil(x) {
  if (!(x > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(x));
  for (const step of [1, 2, 2.5, 5, 10]) if (x <= step * power) return step * power;
  return 10 * power;
}

export class LineChart {
  // series: [{ key, name }]; format: value -> text; fixedMax: a known top (1 for ratios), else from the data.
  constructor(parent, { title, series, format, fixedMax = null }) {
    this.series = series;
    this.format = format;
    this.fixedMax = fixedMax;
    this.samples = [];
    this.hover = null;
    const figure = document.createElement("figure");
    figure.className = "chart";
    const caption = document.createElement("figcaption");
    const name = document.createElement("span");
    name.className = "chart-title";
    name.textContent = title;
    caption.append(name);
    this.legend = series.map((s, i) => {
      const item = document.createElement("span");
      item.className = `legend s${(i % 6) + 1}`;
      const swatch = document.createElement("i");
      const value = document.createElement("b");
      item.append(swatch, `${s.name} `, value);
      caption.append(item);
      return value;
    });
    this.canvas = document.createElement("canvas");
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", `${title}, last minutes`);
    figure.append(caption, this.canvas);
    parent.append(figure);
    this.canvas.addEventListener("mousemove", (e) => this.pointAt(e.offsetX));
    this.canvas.addEventListener("mouseleave", () => this.pointAt(null));
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  // samples: [{ t, ...keys }] oldest first; spanS: seconds shown, ending at the last sample.
  update(samples, spanS) {
    this.samples = samples;
    this.spanS = spanS;
    this.draw();
  }

  pointAt(x) {
    if (x == null || !this.samples.length) {
      this.hover = null;
    } else {
      const t = this.t0 + ((x - PAD.left) / this.plotW) * this.spanS;
      let best = this.samples[0];
      for (const s of this.samples) if (Math.abs(s.t - t) < Math.abs(best.t - t)) best = s;
      this.hover = best;
    }
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const style = getComputedStyle(canvas);
    const colors = [1, 2, 3, 4, 5, 6].map((i) => style.getPropertyValue(`--s${i}`).trim());
    const ink = style.getPropertyValue("--muted").trim();
    const grid = style.getPropertyValue("--grid").trim();
    ctx.font = `11px ${style.fontFamily}`;

    const samples = this.samples;
    const tEnd = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
    this.t0 = tEnd - this.spanS;
    this.plotW = w - PAD.left - PAD.right;
    const plotH = h - PAD.top - PAD.bottom;
    let top = 0;
    for (const s of samples) for (const { key } of this.series) if (s[key] != null) top = Math.max(top, s[key]);
    const yMax = this.fixedMax ?? niceCeil(top);
    const x = (t) => PAD.left + ((t - this.t0) / this.spanS) * this.plotW;
    const y = (v) => PAD.top + plotH - (v / yMax) * plotH;

    ctx.strokeStyle = grid;
    ctx.fillStyle = ink;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const v of [0, yMax / 2, yMax]) {
      const py = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PAD.left, py);
      ctx.lineTo(w - PAD.right, py);
      ctx.stroke();
      ctx.fillText(this.format(v), PAD.left - 6, py);
    }
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(this.spanS >= 120 ? `${Math.round(this.spanS / 60)} min ago` : `${Math.round(this.spanS)} s ago`,
      PAD.left, h - 4);
    ctx.textAlign = "right";
    ctx.fillText("now", w - PAD.right, h - 4);

    ctx.lineWidth = 1.5;
    ctx.lineJoin = "round";
    this.series.forEach(({ key }, i) => {
      ctx.strokeStyle = colors[i % colors.length];
      ctx.fillStyle = colors[i % colors.length];
      ctx.beginPath();
      let run = []; // consecutive points: a line, or a dot when alone
      const flush = () => {
        if (run.length === 1) ctx.fillRect(run[0][0] - 1.5, run[0][1] - 1.5, 3, 3);
        run = [];
      };
      let previous = null;
      for (const s of samples) {
        const v = s[key];
        if (v == null || s.t < this.t0) {
          flush();
          previous = null;
          continue;
        }
        const point = [x(s.t), y(Math.min(v, yMax))];
        // A gap in the samples (the server was away) is a gap in the line, not a slope across it.
        if (previous && s.t - previous.t < 3) {
          ctx.lineTo(...point);
        } else {
          flush();
          ctx.moveTo(...point);
        }
        run.push(point);
        previous = s;
      }
      flush();
      ctx.stroke();
    });

    const shown = this.hover ?? samples[samples.length - 1];
    if (this.hover) {
      ctx.strokeStyle = ink;
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(Math.round(x(this.hover.t)) + 0.5, PAD.top);
      ctx.lineTo(Math.round(x(this.hover.t)) + 0.5, PAD.top + plotH);
      ctx.stroke();
    }
    this.series.forEach(({ key }, i) => {
      this.legend[i].textContent = shown ? this.format(shown[key]) : this.format(null);
    });
  }
}
