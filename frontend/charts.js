// Canvas charts without a library: a time series (lines or bars) and a sparkline. Colours come from the CSS
// variables, so a theme change redraws them; the canvas is sized for the device pixel ratio.
import { h } from "./dom.js";

const PALETTE = ["#2855d8", "#d8742a", "#1f9d55", "#c0392b", "#8e44ad", "#0f9bb3", "#b8860b", "#e84393"];

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = canvas.clientHeight || 150;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, width, height };
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function shortNumber(v) {
  if (v >= 1e9) return `${+(v / 1e9).toFixed(1)}G`;
  if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  if (v > 0 && v < 1) return `${+v.toPrecision(2)}`;
  return `${+v.toFixed(v < 10 ? 2 : 0)}`;
}

/** series: [{label, points: [[x epoch s, y]]}]; kind "line" or "bar". */
export function drawSeries(canvas, series, { kind = "line", unit = "", from, to, step } = {}) {
  const { ctx, width, height } = prepare(canvas);
  const pad = { left: 44, right: 8, top: 8, bottom: 20 };
  const text = cssVar("--muted"), grid = cssVar("--border");
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1] || 0));
  // the last bucket runs `step` seconds past its start: the axis reaches its end, even past `to` (now)
  const x0 = from ?? Math.min(...xs), x1 = Math.max(to ?? -Infinity, xs.length ? Math.max(...xs) + (step || 0) : 0);
  const yMax = niceMax(Math.max(0, ...ys));
  ctx.font = "11px system-ui, sans-serif";
  // the y axis is as wide as its widest label
  const yLabels = [0, 1, 2, 3, 4].map((i) => shortNumber(yMax * (1 - i / 4)) + unit);
  pad.left = Math.ceil(Math.max(...yLabels.map((l) => ctx.measureText(l).width))) + 10;
  ctx.fillStyle = text;
  ctx.strokeStyle = grid;
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.top + ((height - pad.top - pad.bottom) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, y + 0.5); ctx.lineTo(width - pad.right, y + 0.5); ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(yLabels[i], pad.left - 4, y + 4);
  }
  if (!xs.length) {
    ctx.textAlign = "center";
    ctx.fillText("no requests in this range", width / 2, height / 2);
    return;
  }
  const span = Math.max(1, x1 - x0);
  const px = (x) => pad.left + ((x - x0) / span) * (width - pad.left - pad.right);
  const py = (y) => height - pad.bottom - (y / yMax) * (height - pad.top - pad.bottom);
  ctx.textAlign = "center";
  for (const x of [x0, x0 + span / 2, x1]) {
    const d = new Date(x * 1000);
    const label = span > 2 * 86400 ? d.toLocaleDateString(undefined, { month: "short", day: "numeric" })
      : d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    ctx.fillText(label, Math.min(Math.max(px(x), pad.left + 20), width - 24), height - 5);
  }
  series.forEach((s, i) => {
    const colour = s.colour || PALETTE[i % PALETTE.length];
    ctx.strokeStyle = colour;
    ctx.fillStyle = colour;
    ctx.lineWidth = 1.75;
    if (kind === "bar") {
      // a bucket starts at x and lasts `step` seconds: the bar covers 80 % of it, split between the series
      const slot = ((step || span / Math.max(1, s.points.length)) / span) * (width - pad.left - pad.right);
      const w = Math.max(1, (slot * 0.8) / series.length);
      for (const [x, y] of s.points) ctx.fillRect(px(x) + slot * 0.1 + i * w, py(y || 0), w, py(0) - py(y || 0));
    } else {
      ctx.beginPath();
      s.points.forEach(([x, y], j) => (j ? ctx.lineTo(px(x), py(y || 0)) : ctx.moveTo(px(x), py(y || 0))));
      ctx.stroke();
      if (s.points.length === 1) ctx.fillRect(px(s.points[0][0]) - 2, py(s.points[0][1] || 0) - 2, 4, 4);
    }
  });
}

/** A chart card: title, legend, canvas (role img with a text summary); redraws on resize and theme change. */
export function chartCard(title, series, options = {}) {
  const canvas = h("canvas", { role: "img", "aria-label": `${title}: ${summaryText(series)}` });
  const legend = series.length > 1 ? h("div", { class: "hint" }, series.map((s, i) => {
    const dot = h("span", { "aria-hidden": "true" }, "● ");
    dot.style.color = s.colour || PALETTE[i % PALETTE.length]; // CSSOM: allowed by the page's CSP
    return [dot, h("span", { class: "muted" }, s.label, "  ")];
  })) : null;
  const card = h("div", { class: "chart" }, h("h3", {}, title), legend, canvas);
  const draw = () => drawSeries(canvas, series, options);
  requestAnimationFrame(draw);
  const observer = new ResizeObserver(() => requestAnimationFrame(draw));
  observer.observe(canvas);
  window.addEventListener("themechange", draw);
  card.chartCanvas = canvas;
  card.dispose = () => { observer.disconnect(); window.removeEventListener("themechange", draw); };
  return card;
}

function summaryText(series) {
  return series.map((s) => `${s.label} ${s.points.length} points, max ${Math.max(0, ...s.points.map((p) => p[1] || 0))}`)
    .join("; ") || "no data";
}

export function sparkline(values, label) {
  const canvas = h("canvas", { class: "spark", width: 80, height: 20, role: "img",
    "aria-label": `${label}: ${values.reduce((a, b) => a + b, 0)} requests` });
  const draw = () => {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, 80, 20);
    const max = Math.max(1, ...values);
    ctx.strokeStyle = cssVar("--accent");
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = values.length > 1 ? (i / (values.length - 1)) * 78 + 1 : 40;
      const y = 19 - (v / max) * 17;
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  };
  requestAnimationFrame(draw);
  return canvas;
}

export function downloadPng(canvas, name) {
  canvas.toBlob((blob) => {
    const a = h("a", { href: URL.createObjectURL(blob), download: `${name}.png` });
    document.body.append(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  });
}
