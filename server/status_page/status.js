// The status page: reads /status.json every second and draws it; plain DOM and SVG.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
// Round labels on a chart's axis: one per round overlaps from about ten rounds on.
const MAX_ROUND_LABELS = 8;
// Keys of the federated evaluation that are counts, not a metric of the model.
const FED_EVAL_COUNTS = new Set(["clients", "examples", "bytes_down"]);
let shownRounds = "";

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function renderRun(run) {
  document.getElementById("run-task").textContent = `${run.task} (${run.strategy})`;
  const parts = [`run ${run.run_id.slice(0, 8)}`, `phase ${run.phase}`];
  if (run.round !== null) parts.push(`round ${run.round}/${run.rounds}`);
  if (run.attempt !== null && run.attempt > 1) parts.push(`attempt ${run.attempt}`);
  parts.push(`${run.completed} completed`);
  if (run.selected.length) parts.push(`${run.reported.length}/${run.selected.length} reported`);
  if (run.deadline_in_s !== null) parts.push(`deadline in ${Math.round(run.deadline_in_s)} s`);
  document.getElementById("run-line").textContent = parts.join(" · ");
}

function transferCell(client, run) {
  const cell = el("td");
  let done = 0, total = 0;
  if (client.state === "downloading") { done = client.bytes_down; total = run.model_bytes; }
  if (client.state === "uploading") { done = client.bytes_up; total = run.upload_bytes; }
  if (total > 0) {
    const value = Math.min(done, total);
    cell.append(el("progress", { max: total, value }), ` ${Math.round((100 * value) / total)}%`);
  }
  return cell;
}

function renderClients(status) {
  const body = document.querySelector("#clients tbody");
  const rows = status.clients.map((c) => {
    const row = el("tr", { "data-client": c.name, "data-state": c.state });
    const state = el("td");
    state.append(el("span", { class: `state state-${c.state}` }, c.state));
    row.append(
      el("td", {}, c.name), state, transferCell(c, status.run),
      el("td", { class: "num" }, bytes(c.bytes_down)),
      el("td", { class: "num" }, bytes(c.bytes_up)),
      el("td", { class: "num" }, `${bytes(c.down_rate_Bps + c.up_rate_Bps)}/s`),
      el("td", { class: "num" }, `${c.last_seen_s.toFixed(1)} s ago`),
    );
    return row;
  });
  body.replaceChildren(...rows);
}

// The rounds of `rounds` (sorted) that get a label: at most `max`, evenly spaced, the
// first and the last always among them.
function roundLabels(rounds, max = MAX_ROUND_LABELS) {
  const step = Math.max(1, Math.ceil(rounds.length / max));
  const shown = rounds.filter((_, i) => i % step === 0);
  if (shown.length) shown[shown.length - 1] = rounds[rounds.length - 1];
  return shown;
}

// Panels: each metric with its train_, eval_ (the coordinator's held-out data) and
// fed_eval_ (the clients' own, --eval-every) series together, then bytes and time.
function panels(rounds) {
  const names = new Set();
  for (const record of rounds) {
    for (const key of Object.keys(record)) {
      const match = /^(train|eval|fed_eval)_(.+)$/.exec(key);
      if (!match || typeof record[key] !== "number" || match[2] === "num_examples") continue;
      if (match[1] === "fed_eval" && FED_EVAL_COUNTS.has(match[2])) continue;
      names.add(match[2]);
    }
  }
  const out = [...names].sort().map((name) => ({
    title: name, series: [`train_${name}`, `eval_${name}`, `fed_eval_${name}`], scale: 1, unit: "",
  }));
  out.push({
    title: "bytes per round", series: ["bytes_down", "bytes_up", "fed_eval_bytes_down"],
    scale: 2 ** -20, unit: " MiB",
  });
  out.push({ title: "round time", series: ["duration_s"], scale: 1, unit: " s" });
  return out;
}

function chart(panel, rounds) {
  const W = 330, H = 180, L = 62, R = 10, T = 10, B = 28;
  const series = panel.series
    .map((key) => ({ key, points: rounds.filter((r) => typeof r[key] === "number").map((r) => [r.round, r[key] * panel.scale]) }))
    .filter((s) => s.points.length);
  const figure = el("figure", { "data-panel": panel.title });
  figure.append(el("figcaption", {}, panel.title));
  const svg = el("svg:svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1);
  let y0 = Math.min(...ys, 0), y1 = Math.max(...ys, 0);
  if (y1 === y0) y1 = y0 + 1;
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(
    el("svg:line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    el("svg:line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    el("svg:text", { x: L - 4, y: py(y1) + 4, "text-anchor": "end" }, `${+y1.toPrecision(3)}${panel.unit}`),
    el("svg:text", { x: L - 4, y: py(y0) + 4, "text-anchor": "end" }, `${+y0.toPrecision(3)}`),
    el("svg:text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "round"),
  );
  for (const x of roundLabels([...new Set(xs)].sort((a, b) => a - b))) {
    svg.append(el("svg:text", { x: px(x), y: H - B + 12, "text-anchor": "middle" }, String(x)));
  }
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const path = s.points.map((p) => `${px(p[0])},${py(p[1])}`).join(" ");
    svg.append(el("svg:polyline", { class: "line", stroke: color, points: path }));
    for (const [x, y] of s.points) {
      const dot = el("svg:circle", { cx: px(x), cy: py(y), r: 3.5, fill: color, "data-series": s.key, "data-round": x });
      dot.append(el("svg:title", {}, `${s.key} round ${x}: ${+y.toPrecision(4)}${panel.unit}`));
      svg.append(dot);
    }
    const entry = el("span", {}, `● ${s.key}`);
    entry.style.color = color; // CSSOM, not a style attribute: the page's CSP allows no inline style
    legend.append(entry);
  });
  figure.append(svg, legend);
  return figure;
}

function renderRounds(rounds) {
  const key = JSON.stringify(rounds);
  if (key === shownRounds) return;
  shownRounds = key;
  document.getElementById("curves").replaceChildren(...panels(rounds).map((p) => chart(p, rounds)));
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const response = await fetch("/status.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`status.json: HTTP ${response.status}`);
    const status = await response.json();
    renderRun(status.run);
    renderClients(status);
    renderRounds(status.rounds);
    error.hidden = true;
  } catch (exc) {
    error.textContent = `cannot read the coordinator's status: ${exc.message}`;
    error.hidden = false;
  } finally {
    setTimeout(refresh, 1000);
  }
}

refresh();
