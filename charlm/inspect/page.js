// charlm inspect: the page's whole behaviour. Reads the JSON in #charlm-data and the
// deflated, base64 activations in #charlm-blob (no network, no server: works from file://).
// Corpus text only ever enters the page through textContent, never as HTML.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("charlm-data").textContent);
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const SVG = "http://www.w3.org/2000/svg";
  const svgEl = (tag, attrs) => {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  };
  const text = data.text;
  const n = text.length;
  const fmt = (x, d) => (x === null || x === undefined || Number.isNaN(x) ? "n/a" : x.toFixed(d));
  const pct = (x) => (100 * x).toFixed(1) + "%";

  // ------------------------------------------------------------------ palettes
  // 256 entries each: background and the text colour (black or white) that contrasts more.
  function hex(c) { return [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)); }
  function lum(rgb) {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(rgb[0]) + 0.7152 * f(rgb[1]) + 0.0722 * f(rgb[2]);
  }
  function palette(anchors) {
    const stops = anchors.map(hex);
    const bg = [], fg = [];
    for (let q = 0; q < 256; q++) {
      const t = (q / 255) * (stops.length - 1);
      const i = Math.min(Math.floor(t), stops.length - 2), u = t - i;
      const rgb = [0, 1, 2].map((k) => Math.round(stops[i][k] + u * (stops[i + 1][k] - stops[i][k])));
      bg.push(`rgb(${rgb[0]},${rgb[1]},${rgb[2]})`);
      const L = lum(rgb); // contrast with black (L+.05)/.05, with white 1.05/(L+.05)
      fg.push((L + 0.05) / 0.05 >= 1.05 / (L + 0.05) ? "#000" : "#fff");
    }
    return { bg, fg, css: `linear-gradient(to right, ${anchors.join(", ")})` };
  }
  const PAL = {
    surprise: palette(["#ffffff", "#fff1a8", "#fdbb5f", "#f4743b", "#d1261c", "#6b0010"]),
    gate: palette(["#ffffff", "#dbe9f6", "#9dc6e0", "#4a97c9", "#1764ab", "#08306b"]),
    signed: palette(["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
                     "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"]),
    attention: palette(["#ffffff", "#ebe7f3", "#c6c1df", "#9e97c8", "#6a51a3", "#3a0078"]),
    feature: palette(["#ffffff", "#e2f2dc", "#a9dba0", "#5db46a", "#228a45", "#00441b"]),
  };
  const SURPRISE_MAX = data.meta.surpriseMaxBits;

  // ------------------------------------------------------------------ state
  const units = {}; // "l0.h" -> quantity record (+ .bytes once decoded)
  for (const q of data.quantities) units[q.name] = q;
  const att = {};
  for (const a of data.attention) att[a.name] = a;
  const layers = [...new Set([...data.quantities, ...data.attention].map((q) => q.layer))].sort((a, b) => a - b);
  const sel = { mode: "surprise", layer: layers[0], q: null, unit: 0, head: -1, feature: null };
  let active = 0; // the character with the keyboard focus (the attention query)
  let blob = null;
  let spans = [];

  // ------------------------------------------------------------------ values
  function unitValue(name, unit, j) {
    const q = units[name], b = blob[q.offset + unit * n + j];
    if (q.kind === "gate") return b / 255;
    return (b / 127.5 - 1) * (q.scale ? q.scale[unit] : 1);
  }
  function attWeight(name, head, j, d) { // weight of char j on char j - d (head -1: mean)
    const a = att[name];
    if (d < 0 || d >= a.width) return 0;
    if (head >= 0) return blob[a.offset + (head * n + j) * a.width + d] / 255;
    let s = 0;
    for (let h = 0; h < a.heads; h++) s += blob[a.offset + (h * n + j) * a.width + d];
    return s / 255 / a.heads;
  }
  const qName = () => `l${sel.layer}.${sel.q}`;
  const isAttention = () => sel.mode === "unit" && att[qName()] !== undefined;

  // ------------------------------------------------------------------ painting
  function paint() {
    const t0 = performance.now();
    const colour = new Int16Array(n).fill(-1); // palette index per char; -1 = neutral
    let pal = PAL.surprise, legend;
    if (sel.mode === "surprise") {
      for (let j = 1; j < n; j++) colour[j] = Math.round(Math.min(data.loss[j] / SURPRISE_MAX, 1) * 255);
      legend = ["0 bits (expected)", `${SURPRISE_MAX} bits or more (surprising)`];
    } else if (sel.mode === "feature") {
      const f = data.features[sel.feature], mx = f.values.reduce((a, b) => Math.max(a, b), 0) || 1;
      for (let j = 0; j < n; j++) colour[j] = Math.round((f.values[j] / mx) * 255);
      pal = PAL.feature;
      legend = ["0", `${mx} (${f.label})`];
    } else if (isAttention()) {
      const a = att[qName()], w = [];
      pal = PAL.attention;
      for (let d = 0; d < a.width && active - d >= 0; d++) w.push(attWeight(a.name, sel.head, active, d));
      const top = $("stretch").checked ? Math.max(...w) || 1 : 1;
      w.forEach((x, d) => { colour[active - d] = Math.round(Math.sqrt(x / top) * 255); });
      legend = ["weight 0", `${top === 1 ? "1" : fmt(top, 3) + ", this row's largest"} (square-root scale)`];
    } else {
      const q = units[qName()], base = q.offset + sel.unit * n;
      pal = q.kind === "gate" ? PAL.gate : PAL.signed;
      if (q.kind === "free") {
        const s = q.scale[sel.unit];
        for (let j = 0; j < n; j++) colour[j] = Math.round((Math.tanh((blob[base + j] / 127.5 - 1) * s) + 1) * 127.5);
      } else {
        for (let j = 0; j < n; j++) colour[j] = blob[base + j];
      }
      legend = q.kind === "gate" ? ["0 (closed)", "1 (open)"]
        : q.kind === "free" ? ["tanh(value) = -1", "+1 (value on hover)"] : ["-1", "0", "+1"];
    }
    for (let j = 0; j < n; j++) {
      const s = spans[j].style, c = colour[j];
      if (c < 0) { s.backgroundColor = "#f2f2f2"; s.color = "#595959"; }
      else { s.backgroundColor = pal.bg[c]; s.color = pal.fg[c]; }
    }
    $("legend-bar").style.background = pal.css;
    const lab = $("legend-labels");
    lab.textContent = "";
    for (const l of legend) lab.appendChild(el("span", {}, l));
    const ms = performance.now() - t0;
    document.body.dataset.paintMs = ms.toFixed(1);
    $("status").textContent = `repainted ${n.toLocaleString()} characters in ${ms.toFixed(1)} ms`;
    describe(active);
  }

  // ------------------------------------------------------------------ the character panel
  const NAMES = { " ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return" };
  function shown(c) { // a visible marker for whitespace and control characters
    if (c === " ") return "\u00b7";
    if (c === "\n") return "\u21b5";
    if (c === "\t") return "\u21e5";
    const code = c.codePointAt(0);
    if (code < 32) return String.fromCodePoint(0x2400 + code);
    if (code === 127) return "\u2421";
    return c;
  }
  function label(c) {
    const code = "U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    return `${shown(c)} ${NAMES[c] ? "(" + NAMES[c] + ") " : ""}${code}`;
  }
  function describe(j) {
    const info = $("info");
    info.textContent = "";
    const c = text[j];
    info.appendChild(el("p", { class: "big" }, label(c)));
    info.appendChild(el("p", {}, `character ${j + 1} of ${n}, line ${lineOf[j] + 1}, column ${colOf[j] + 1}`));
    if (j === 0) {
      info.appendChild(el("p", {}, "The first character: the model has read nothing yet, so it made no prediction."));
    } else {
      const p = Math.pow(2, -data.loss[j]);
      info.appendChild(el("p", {}, `loss ${fmt(data.loss[j], 2)} bits (p = ${fmt(p, 3)}), entropy of the guess ${fmt(data.entropy[j], 2)} bits`));
      info.appendChild(el("p", { class: "head" }, "Before reading it, the model guessed:"));
      const list = el("ol", { class: "top" });
      const k = data.topK;
      for (let r = 0; r < k; r++) {
        const id = data.top[j * k + r], pr = data.topP[j * k + r];
        const li = el("li");
        li.appendChild(el("span", { class: "g" }, shown(data.vocab[id])));
        const bar = el("span", { class: "bar" });
        bar.style.width = `${Math.max(1, Math.round(pr * 120))}px`;
        li.appendChild(bar);
        li.appendChild(el("span", {}, ` ${pct(pr)}${data.vocab[id] === c ? "  \u2713 (the actual one)" : ""}`));
        list.appendChild(li);
      }
      info.appendChild(list);
    }
    if (sel.mode === "unit" && !isAttention()) {
      info.appendChild(el("p", { class: "value" }, `layer ${sel.layer} ${sel.q} unit ${sel.unit}: ${fmt(unitValue(qName(), sel.unit, j), 3)}`));
    } else if (isAttention()) {
      const d = active - j, a = att[qName()];
      info.appendChild(el("p", { class: "value" }, d >= 0 && d < a.width
        ? `attention of the selected character (${j === active ? "itself" : d + " back"}) on this one: ${fmt(attWeight(a.name, sel.head, active, d), 3)}`
        : "outside the selected character's context"));
    } else if (sel.mode === "feature") {
      const f = data.features[sel.feature];
      info.appendChild(el("p", { class: "value" }, `${f.label}: ${f.values[j]}`));
    }
  }
  function describeHeads() { // per head, what the active character attends to most
    const box = $("heads");
    box.textContent = "";
    if (!isAttention()) { box.hidden = true; return; }
    box.hidden = false;
    const a = att[qName()];
    box.appendChild(el("p", { class: "head" }, `Character ${active + 1} (${label(text[active])}) attends most to:`));
    const table = el("table");
    for (let h = 0; h < a.heads; h++) {
      const w = [];
      for (let d = 0; d < a.width && active - d >= 0; d++) w.push([attWeight(a.name, h, active, d), d]);
      w.sort((x, y) => y[0] - x[0]);
      const row = el("tr");
      row.appendChild(el("th", { scope: "row" }, `head ${h}`));
      row.appendChild(el("td", {}, w.slice(0, 4).map(([x, d]) =>
        `${shown(text[active - d])} (${d === 0 ? "itself" : d + " back"}) ${fmt(x, 2)}`).join(",  ")));
      table.appendChild(row);
    }
    box.appendChild(table);
  }

  // ------------------------------------------------------------------ the text
  const lineOf = new Int32Array(n), colOf = new Int32Array(n);
  for (let j = 0, line = 0, col = 0; j < n; j++) {
    lineOf[j] = line; colOf[j] = col;
    if (text[j] === "\n") { line++; col = 0; } else col++;
  }
  function buildText() {
    const box = $("text");
    const frag = document.createDocumentFragment();
    spans = new Array(n);
    for (let j = 0; j < n; j++) {
      const c = text[j];
      const s = document.createElement("span");
      s.className = c === " " || c === "\n" || c === "\t" || c.codePointAt(0) < 32 ? "ch ws" : "ch";
      if (c === "\t") s.classList.add("tab");
      s.textContent = shown(c);
      s.tabIndex = j === 0 ? 0 : -1;
      s.j = j;
      spans[j] = s;
      frag.appendChild(s);
      if (c === "\n") frag.appendChild(document.createElement("br"));
    }
    box.appendChild(frag);
    box.addEventListener("mouseover", (e) => { if (e.target.j !== undefined) describe(e.target.j); });
    box.addEventListener("mouseleave", () => describe(active));
    box.addEventListener("click", (e) => { if (e.target.j !== undefined) moveTo(e.target.j); });
    box.addEventListener("focusin", (e) => { if (e.target.j !== undefined && e.target.j !== active) moveTo(e.target.j); });
    box.addEventListener("keydown", onKey);
  }
  function moveTo(j, focus) {
    j = Math.max(0, Math.min(n - 1, j));
    spans[active].tabIndex = -1;
    spans[active].classList.remove("active");
    active = j;
    spans[j].tabIndex = 0;
    spans[j].classList.add("active");
    if (focus) spans[j].focus();
    if (isAttention()) { paint(); describeHeads(); } else describe(j);
  }
  function onKey(e) {
    const step = { ArrowLeft: -1, ArrowRight: 1 }[e.key];
    if (step) { moveTo(active + step, true); e.preventDefault(); return; }
    if (e.key === "Home") { moveTo(0, true); e.preventDefault(); return; }
    if (e.key === "End") { moveTo(n - 1, true); e.preventDefault(); return; }
    const up = { ArrowUp: 1, ArrowDown: -1, PageUp: 10, PageDown: -10 }[e.key];
    if (up && sel.mode === "unit") { stepUnit(up); e.preventDefault(); }
  }

  // ------------------------------------------------------------------ view 2 controls
  function quantitiesOf(layer) {
    return [...data.quantities, ...data.attention].filter((q) => q.layer === layer);
  }
  function fillQuantities() {
    const qs = $("quantity");
    qs.textContent = "";
    for (const q of quantitiesOf(sel.layer)) {
      qs.appendChild(el("option", { value: q.q }, `${q.q}: ${q.title}`));
    }
    if (!quantitiesOf(sel.layer).some((q) => q.q === sel.q)) sel.q = quantitiesOf(sel.layer)[0].q;
    qs.value = sel.q;
  }
  function syncControls() {
    $("layer").value = String(sel.layer);
    fillQuantities();
    const attention = att[qName()] !== undefined;
    $("unit-controls").hidden = attention;
    $("head-controls").hidden = !attention;
    if (attention) {
      const hs = $("head"), a = att[qName()];
      if (hs.options.length !== a.heads + 1) {
        hs.textContent = "";
        hs.appendChild(el("option", { value: "-1" }, "all heads (mean)"));
        for (let h = 0; h < a.heads; h++) hs.appendChild(el("option", { value: String(h) }, `head ${h}`));
      }
      hs.value = String(sel.head);
    } else {
      const q = units[qName()];
      sel.unit = Math.max(0, Math.min(q.units - 1, sel.unit));
      $("unit").max = String(q.units - 1);
      $("unit").value = String(sel.unit);
      $("unit-count").textContent = `of ${q.units} (0 to ${q.units - 1})`;
      $("kind-note").textContent = q.note;
    }
    for (const b of document.querySelectorAll("#tabs button")) {
      b.setAttribute("aria-pressed", String(b.dataset.mode === sel.mode));
    }
    $("unit-panel").hidden = sel.mode !== "unit";
    $("feature-note").hidden = sel.mode !== "feature";
    if (sel.mode === "feature") $("feature-note").textContent = `Showing the feature "${data.features[sel.feature].label}" itself (${data.features[sel.feature].help}). Choose a view above to go back.`;
    if (sel.mode === "unit") history.replaceState(null, "", "#" + qName() + (isAttention() ? "" : "." + sel.unit));
  }
  function select(changes) {
    Object.assign(sel, changes);
    syncControls();
    paint();
    describeHeads();
  }
  function stepUnit(by) {
    if (isAttention()) {
      const a = att[qName()];
      select({ head: ((sel.head + 1 + by) % (a.heads + 1) + a.heads + 1) % (a.heads + 1) - 1 });
    } else {
      const q = units[qName()];
      select({ unit: Math.max(0, Math.min(q.units - 1, sel.unit + by)) });
    }
  }
  function buildControls() {
    for (const b of document.querySelectorAll("#tabs button")) {
      b.addEventListener("click", () => select({ mode: b.dataset.mode }));
    }
    const ls = $("layer");
    for (const l of layers) ls.appendChild(el("option", { value: String(l) }, `layer ${l}`));
    ls.addEventListener("change", () => select({ layer: Number(ls.value) }));
    $("quantity").addEventListener("change", () => select({ q: $("quantity").value }));
    $("unit").addEventListener("input", () => {
      const v = Number($("unit").value); // "" while the user retypes it: wait
      if ($("unit").value !== "" && Number.isInteger(v)) select({ unit: v });
    });
    $("unit-prev").addEventListener("click", () => stepUnit(-1));
    $("unit-next").addEventListener("click", () => stepUnit(1));
    $("head").addEventListener("change", () => select({ head: Number($("head").value) }));
    $("stretch").addEventListener("change", () => paint());
    sel.q = quantitiesOf(sel.layer)[0].q;
  }
  function show(name, unit) { // from views 3 and 4: show one unit in view 2
    const q = units[name] || att[name];
    select({ mode: "unit", layer: q.layer, q: q.q, unit: unit || 0 });
    $("view-text").scrollIntoView({ block: "start" });
    spans[active].focus({ preventScroll: true });
  }

  // ------------------------------------------------------------------ view 3
  function buildFeatures() {
    const body = $("features");
    if (!data.features.length) {
      body.appendChild(el("p", {}, "This model has no units to correlate (no traced quantities per unit)."));
    }
    const table = el("table");
    const head = el("tr");
    for (const h of ["feature", "the 5 units that follow it most closely (click one to see it above)", ""]) head.appendChild(el("th", { scope: "col" }, h));
    table.appendChild(head);
    data.features.forEach((f, i) => {
      const row = el("tr");
      const name = el("th", { scope: "row" }, f.label);
      name.appendChild(el("div", { class: "help" }, f.help));
      row.appendChild(name);
      const cell = el("td");
      for (const m of f.top) {
        const q = units[m.quantity];
        const b = el("button", { type: "button", class: "match" },
          `layer ${q.layer} ${q.q} #${m.unit}  r = ${m.r >= 0 ? "+" : "\u2212"}${Math.abs(m.r).toFixed(2)}`);
        b.addEventListener("click", () => show(m.quantity, m.unit));
        cell.appendChild(b);
      }
      row.appendChild(cell);
      const showBtn = el("button", { type: "button" }, "colour the text by this feature");
      showBtn.addEventListener("click", () => { select({ mode: "feature", feature: i }); $("view-text").scrollIntoView(); });
      const c3 = el("td");
      c3.appendChild(showBtn);
      row.appendChild(c3);
      table.appendChild(row);
    });
    if (data.features.length) body.appendChild(table);
    if (data.absentFeatures.length) {
      body.appendChild(el("p", { class: "help" }, `Not in this text (constant, so nothing can correlate with it): ${data.absentFeatures.join("; ")}.`));
    }
  }

  // ------------------------------------------------------------------ view 4
  function buildSaturation() {
    const box = $("saturation");
    if (!data.saturation.length) {
      box.appendChild(el("p", {}, "This model has no gates, so there is nothing to saturate."));
      return;
    }
    const S = 200, M = 40, B = 36; // plot size, left and bottom margins, in px
    const rows = {};
    for (const g of data.saturation) {
      if (!rows[g.layer]) {
        const wrap = el("div", { class: "sat-layer" });
        wrap.appendChild(el("h3", {}, `layer ${g.layer}`));
        rows[g.layer] = el("div", { class: "plots" });
        wrap.appendChild(rows[g.layer]);
        box.appendChild(wrap);
      }
      const fig = el("figure");
      const svg = svgEl("svg", { width: S + M + 10, height: S + B + 8, role: "img",
        "aria-label": `layer ${g.layer} ${g.title}: one dot per unit; x = fraction of steps below 0.1, y = fraction above 0.9` });
      const X = (v) => M + v * S, Y = (v) => 8 + (1 - v) * S;
      const text = (x, y, t, attrs) => { const e = svgEl("text", { x, y, class: "tick", ...attrs }); e.textContent = t; svg.appendChild(e); };
      svg.appendChild(svgEl("rect", { x: M, y: 8, width: S, height: S, fill: "#fafafa", stroke: "#666" }));
      svg.appendChild(svgEl("line", { x1: X(0), y1: Y(1), x2: X(1), y2: Y(0), stroke: "#bbb", "stroke-dasharray": "4 3" }));
      for (const [v, t] of [[0, "0"], [0.5, "0.5"], [1, "1"]]) {
        text(X(v), S + 22, t, { "text-anchor": "middle" });
        text(M - 5, Y(v) + 4, t, { "text-anchor": "end" });
      }
      text(X(0.5), S + 36, "fraction of steps < 0.1", { "text-anchor": "middle" });
      text(12, Y(0.5), "fraction > 0.9", { "text-anchor": "middle", transform: `rotate(-90 12 ${Y(0.5)})` });
      g.left.forEach((x, u) => {
        const y = g.right[u];
        const dot = svgEl("circle", { cx: X(x), cy: Y(y), r: 3, class: "dot" });
        const title = svgEl("title");
        title.textContent = `unit ${u}: below 0.1 ${pct(x)} of steps, above 0.9 ${pct(y)}`;
        dot.appendChild(title);
        dot.addEventListener("click", () => show(g.quantity, u));
        svg.appendChild(dot);
      });
      fig.appendChild(svg);
      fig.appendChild(el("figcaption", {}, `${g.title} ${g.q}, layer ${g.layer}`));
      rows[g.layer].appendChild(fig);
    }
  }

  // ------------------------------------------------------------------ view 5
  function buildSummary() {
    const m = data.meta, dl = $("summary");
    for (const [k, v] of m.facts) { dl.appendChild(el("dt", {}, k)); dl.appendChild(el("dd", {}, v)); }
    const pre = $("commands");
    pre.textContent = m.commands.join("\n");
  }

  // ------------------------------------------------------------------ start
  async function inflate(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  function fromHash() {
    const m = /^#l(\d+)\.(\w+)(?:\.(\d+))?$/.exec(location.hash);
    if (!m || !(units[`l${m[1]}.${m[2]}`] || att[`l${m[1]}.${m[2]}`])) return;
    Object.assign(sel, { mode: "unit", layer: Number(m[1]), q: m[2], unit: Number(m[3] || 0) });
  }
  async function start() {
    buildSummary();
    buildText();
    blob = await inflate(document.getElementById("charlm-blob").textContent.trim());
    if (blob.length !== data.blobBytes) throw new Error(`activation data: ${blob.length} bytes, expected ${data.blobBytes}`);
    buildControls();
    buildFeatures();
    buildSaturation();
    fromHash();
    syncControls();
    moveTo(0);
    paint();
    describeHeads();
    document.body.dataset.ready = "1";
  }
  start().catch((err) => {
    $("status").textContent = `This page could not load its data: ${err.message}. It needs a current browser (one with DecompressionStream).`;
    console.error(err);
  });
})();
