/* showattend attention report: one self-contained page (no network), also served by
   `showattend serve` with an upload box. Data: the JSON block #report-data (see report/build.py).
   Maps arrive as uint8 scaled to each map's own peak, base64'd; they are decoded only when their
   image is shown. The heat map is the same computation as showattend.visualize.upsample_attention
   (each grid cell onto its pixels, a Gaussian blur of half a cell, scaled by the maximum) with
   matplotlib's jet colours and opacity 0.15 + 0.55 * heat, so page, PNG overlays and GIFs agree. */
(function () {
  "use strict";

  const data = JSON.parse(document.getElementById("report-data").textContent);
  const models = data.models;
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  const state = {
    order: [],          // image indices in the list's order (sorted, filtered)
    image: -1,          // image shown
    active: 0,          // model panel that the keys move in
    beam: models.map(() => 0),
    word: models.map(() => 0),
    style: "smooth",
    grid: true,
  };
  const shown = [];     // per model panel: what is drawn now (read by the browser tests)
  const panels = [];    // per model panel: its DOM nodes

  // ---------------------------------------------------------------- maps: decode lazily

  const decoded = new WeakMap();
  function beamMaps(beam, grid) {
    let maps = decoded.get(beam);
    if (!maps) {
      const bin = atob(beam.maps);
      const cells = grid[0] * grid[1];
      maps = beam.words.map((_, t) => {
        const m = new Float64Array(cells);
        for (let i = 0; i < cells; i++) m[i] = bin.charCodeAt(t * cells + i) / 255 * beam.peaks[t];
        return m;
      });
      decoded.set(beam, maps);
    }
    return maps;
  }

  // ---------------------------------------------------------------- heat map (= upsample_attention)

  const mats = new Map();
  function upMatrix(n, c, smooth) {  // (n, c): pixel rows ← grid cells (blurred when smooth)
    const key = n + "/" + c + "/" + smooth;
    if (mats.has(key)) return mats.get(key);
    const idx = new Int32Array(n);  // the cell holding each pixel's centre
    for (let r = 0; r < n; r++) idx[r] = Math.floor(((2 * r + 1) * c) / (2 * n));
    const M = new Float64Array(n * c);
    if (!smooth) {
      for (let r = 0; r < n; r++) M[r * c + idx[r]] = 1;
    } else {
      const sigma = 0.5 * n / c, row = new Float64Array(n);
      for (let i = 0; i < n; i++) {
        let sum = 0;
        for (let j = 0; j < n; j++) { const d = (i - j) / sigma; row[j] = Math.exp(-0.5 * d * d); sum += row[j]; }
        for (let j = 0; j < n; j++) M[i * c + idx[j]] += row[j] / sum;
      }
    }
    mats.set(key, M);
    return M;
  }

  function heatmap(map, gh, gw, H, W, smooth) {  // Float64Array (H·W) in [0, 1]
    const R = upMatrix(H, gh, smooth), C = upMatrix(W, gw, smooth);
    const tmp = new Float64Array(H * gw);  // R @ map: (H, gw)
    for (let y = 0; y < H; y++)
      for (let j = 0; j < gw; j++) {
        let s = 0;
        for (let i = 0; i < gh; i++) s += R[y * gh + i] * map[i * gw + j];
        tmp[y * gw + j] = s;
      }
    const up = new Float64Array(H * W);
    let lo = 0, hi = -Infinity;
    for (let y = 0; y < H; y++)
      for (let x = 0; x < W; x++) {
        let s = 0;
        for (let j = 0; j < gw; j++) s += tmp[y * gw + j] * C[x * gw + j];
        up[y * W + x] = s;
        if (s < lo) lo = s;
        if (s > hi) hi = s;
      }
    if (!(hi > lo)) return new Float64Array(H * W);  // all-zero map: nothing to show
    for (let i = 0; i < up.length; i++) up[i] = (up[i] - lo) / (hi - lo);
    return up;
  }

  // matplotlib's "jet" (LinearSegmentedColormap, 256 entries), sampled the way matplotlib does
  const JET = [
    [[0, 0], [0.35, 0], [0.66, 1], [0.89, 1], [1, 0.5]],
    [[0, 0], [0.125, 0], [0.375, 1], [0.64, 1], [0.91, 0], [1, 0]],
    [[0, 0.5], [0.11, 1], [0.34, 1], [0.65, 0], [1, 0]],
  ];
  const LUT = new Uint8ClampedArray(256 * 3);
  for (let k = 0; k < 256; k++) {
    const x = k / 255;
    JET.forEach((seg, ch) => {
      let v = seg[seg.length - 1][1];
      for (let s = 1; s < seg.length; s++)
        if (x <= seg[s][0]) {
          const [x0, y0] = seg[s - 1], [x1, y1] = seg[s];
          v = y0 + (x - x0) / (x1 - x0) * (y1 - y0);
          break;
        }
      LUT[k * 3 + ch] = Math.round(v * 255);
    });
  }

  function paintHeat(canvas, heat, W, H) {
    canvas.width = W;
    canvas.height = H;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(W, H);
    const px = img.data;
    for (let i = 0; i < heat.length; i++) {
      const h = heat[i], k = Math.min(255, Math.floor(h * 256)) * 3;
      px[i * 4] = LUT[k]; px[i * 4 + 1] = LUT[k + 1]; px[i * 4 + 2] = LUT[k + 2];
      px[i * 4 + 3] = Math.round(255 * (0.15 + 0.55 * h));
    }
    ctx.putImageData(img, 0, 0);
  }

  // ---------------------------------------------------------------- header, list, sorting

  const fmt = (v, d) => (v === null || v === undefined || !isFinite(v)) ? "–" : v.toFixed(d);
  const mb = (n) => (n / 1048576).toFixed(1) + " MB";

  function describe(m) {
    const kind = m.attention === "hard" ? `hard attention (${m.mode}, ${m.window}×${m.window} crop)` : `${m.attention} attention`;
    return `${m.name}: ${kind}, ${m.grid[0]}×${m.grid[1]} grid, beam ${m.beam}`;
  }

  function header() {
    $("title").textContent = data.title;
    document.title = data.title;
    const n = data.images.length;
    const scored = data.images.some((im) => im.results.some((r) => r && r.scores));
    let meta = (data.mode === "serve" ? "" : `${n} image${n === 1 ? "" : "s"} · `) + models.map(describe).join(" · ");
    if (scored) meta += " · BLEU-4 and CIDEr per caption against the references; CIDEr's document frequencies come from this report's images";
    const boxed = data.images.filter((im) => im.entities !== undefined).length;
    if (boxed) meta += ` · reference boxes (Flickr30k Entities) for ${boxed} of ${n} images; the figure under a word that names a boxed thing is its attention correctness, the share of its attention on those boxes (red: less than a uniform map's)`;
    $("meta").textContent = meta;
    if (data.skipped && data.skipped.length) {
      const s = $("skipped");
      s.hidden = false;
      s.textContent = `${data.skipped.length} file(s) could not be read: ` +
        data.skipped.map((x) => `${x.path} (${x.reason})`).join("; ");
    }
  }

  function sortOptions() {
    const sel = $("sort");
    const prev = sel.value;
    sel.innerHTML = "";
    const add = (value, label) => { const o = el("option", "", label); o.value = value; sel.appendChild(o); };
    add("input", "input order");
    models.forEach((m, i) => {
      if (data.images.some((im) => im.results[i] && im.results[i].scores)) {
        add(`BLEU-4:${i}`, `worst BLEU-4 first (${m.name})`);
        add(`CIDEr:${i}`, `worst CIDEr first (${m.name})`);
      }
      add(`logp:${i}`, `lowest log p first (${m.name})`);
      if (data.images.some((im) => im.results[i] && im.results[i].grounding))
        add(`grounding:${i}`, `worst grounding first (${m.name})`);
    });
    if ([...sel.options].some((o) => o.value === prev)) sel.value = prev;
  }

  function sortKey(im, how) {
    const [what, i] = how.split(":");
    const r = im.results[+i];
    if (!r) return Infinity;
    if (what === "logp") return r.beams[0].score;
    // mean correctness of the caption's words that name a boxed thing; none such: last
    if (what === "grounding") return r.grounding && r.grounding.words ? r.grounding.correctness : Infinity;
    return r.scores ? r.scores[what] : Infinity;  // images without references go last
  }

  function computeOrder() {
    const how = $("sort").value;
    const q = $("filter").value.trim().toLowerCase();
    let idx = data.images.map((_, i) => i);
    if (q) idx = idx.filter((i) => {
      const im = data.images[i];
      return im.name.toLowerCase().includes(q) ||
        im.results.some((r) => r && (" " + r.beams[0].words.join(" ") + " ").includes(" " + q));
    });
    if (how !== "input") idx.sort((a, b) => (sortKey(data.images[a], how) - sortKey(data.images[b], how)) || (a - b));
    state.order = idx;
  }

  let observer = null;
  function buildList() {
    computeOrder();
    const list = $("list");
    list.innerHTML = "";
    list.classList.toggle("single", data.images.length <= 1 && data.mode !== "serve");
    if (observer) observer.disconnect();
    // thumbnails are set only when scrolled into view: 200 pictures are not decoded at once
    observer = "IntersectionObserver" in window ? new IntersectionObserver((items) => {
      for (const it of items) if (it.isIntersecting) {
        const img = it.target;
        img.src = data.images[+img.dataset.image].views[0];
        observer.unobserve(img);
      }
    }, { root: list, rootMargin: "200px" }) : null;
    const how = $("sort").value;
    const m = how === "input" ? state.active : +how.split(":")[1];
    for (const i of state.order) {
      const im = data.images[i];
      const item = el("div", "item");
      item.dataset.image = i;
      const img = el("img");
      img.alt = "";
      img.dataset.image = i;
      if (observer) observer.observe(img); else img.src = im.views[0];
      const txt = el("div", "txt");
      txt.appendChild(el("div", "nm", im.name));
      const r = im.results[m];
      if (r) {
        txt.appendChild(el("div", "cap", r.beams[0].words.join(" ")));
        let sc = r.scores
          ? `BLEU-4 ${fmt(r.scores["BLEU-4"], 2)} · CIDEr ${fmt(r.scores.CIDEr, 2)}`
          : `log p ${fmt(r.beams[0].score, 2)}`;
        if (r.grounding) sc += r.grounding.words
          ? ` · on boxes ${fmt(r.grounding.correctness, 2)}` : " · no boxed word";
        txt.appendChild(el("div", "sc", sc));
      }
      item.append(img, txt);
      item.addEventListener("click", () => select(i));
      list.appendChild(item);
    }
    markCurrent();
  }

  function markCurrent() {
    for (const item of $("list").children) {
      const on = +item.dataset.image === state.image;
      item.classList.toggle("current", on);
      if (on && item.scrollIntoView) item.scrollIntoView({ block: "nearest" });
    }
  }

  // ---------------------------------------------------------------- the image view

  function select(i, keepWords) {
    if (i < 0 || i >= data.images.length) return;
    state.image = i;
    if (!keepWords) { state.beam = models.map(() => 0); state.word = models.map(() => 0); }
    $("explain").hidden = !(data.mode === "serve" && data.images[i].key);  // an upload: ask away
    buildPanels();
    markCurrent();
  }

  function buildPanels() {
    const im = data.images[state.image];
    $("empty").hidden = true;
    $("name").textContent = im.name;
    $("name").title = im.path;
    const box = $("panels");
    box.innerHTML = "";
    panels.length = 0;
    shown.length = 0;
    models.forEach((m, mi) => {
      const r = im.results[mi];
      const p = el("div", "panel");
      p.dataset.model = mi;
      const h = el("h3", "", m.name + " ");
      h.appendChild(el("small", "", m.attention === "hard" ? `hard · ${m.mode}` : m.attention));
      p.appendChild(h);
      if (!r) { p.appendChild(el("div", "info", "no caption")); box.appendChild(p); panels.push(null); return; }
      const stage = el("div", "stage");
      // the photo's own shape where the model's view stretched it (maps and boxes are placed in
      // percent of the stage, so they stretch with it)
      stage.style.aspectRatio = r.aspect ? `${r.aspect[0]} / ${r.aspect[1]}` : `${r.w} / ${r.h}`;
      if (Math.max(r.w, r.h) <= 128) stage.classList.add("pixelated");  // small synthetic images: crisp pixels
      const photo = el("img", "photo");
      photo.alt = im.name;
      photo.src = im.views[r.view];
      const heat = el("canvas", "heat");
      const marks = el("canvas", "marks");
      const refs = el("div", "refs");  // the selected word's reference boxes, one div each
      stage.append(photo, heat, marks, refs);
      const legend = el("div", "legend");
      legend.appendChild(el("span", "swatch"));
      legend.appendChild(document.createTextNode("reference boxes (Flickr30k Entities)"));
      legend.hidden = im.entities === undefined;
      const info = el("div", "info");
      info.classList.toggle("tall", im.entities !== undefined);  // room for the boxes' figures
      const words = el("div", "words");
      const scores = el("div", "scores");
      const beams = el("ol", "beams");
      p.append(stage, legend, info, words, scores, beams);
      p.addEventListener("click", () => setActive(mi));
      box.appendChild(p);
      panels.push({ p, stage, heat, marks, refs, info, words, scores, beams });
      fillPanel(mi);
    });
    const refs = $("refs");
    refs.innerHTML = "";
    for (const t of im.refs || []) refs.appendChild(el("li", "", t));
    $("refs-box").hidden = !(im.refs && im.refs.length);
    setActive(Math.min(state.active, models.length - 1));
  }

  function fillPanel(mi) {
    const im = data.images[state.image], r = im.results[mi], P = panels[mi];
    const b = r.beams[state.beam[mi]];
    P.words.innerHTML = "";
    b.words.forEach((w, t) => {
      const s = el("span", "word");
      s.dataset.model = mi;
      s.dataset.word = t;
      s.appendChild(el("span", "w", w));
      const bar = el("span", "b");
      const fill = el("i");
      fill.style.width = `${Math.max(0, Math.min(1, b.beta[t])) * 100}%`;
      bar.appendChild(fill);
      s.appendChild(bar);
      s.title = `β = ${fmt(b.beta[t], 3)}`;
      if (b.logp) s.title += ` · log p ${fmt(b.logp[t], 2)} · rank ${b.rank[t]}`;
      if (b.unknown_at && b.unknown_at.includes(t)) {  // fed to the model as <unk>
        s.classList.add("unk");
        s.title += " · not in the model's vocabulary: fed as <unk>";
      }
      const g = b.grounding && b.grounding[t];
      if (g) {  // names a boxed thing: its correctness under the word (a ::after, not text)
        s.classList.add("named");
        s.classList.toggle("below", g.correctness < g.uniform);
        s.dataset.g = fmt(g.correctness, 2);
        s.title += ` · attention on its reference boxes ${fmt(g.correctness, 3)} (a uniform map: ${fmt(g.uniform, 3)}) · peak ${g.pointing ? "inside" : "outside"}`;
      }
      s.addEventListener("mouseenter", () => draw(mi, t));
      s.addEventListener("mouseleave", () => draw(mi, state.word[mi]));
      s.addEventListener("click", (ev) => { ev.stopPropagation(); setActive(mi); setWord(mi, t); });
      P.words.appendChild(s);
    });
    const sc = r.scores;
    P.scores.innerHTML = "";
    if (sc) {
      P.scores.appendChild(el("span", "m", `BLEU-4 ${fmt(sc["BLEU-4"], 3)}`));
      P.scores.appendChild(el("span", "m", `CIDEr ${fmt(sc.CIDEr, 3)}`));
    }
    P.scores.appendChild(el("span", "m", `log p ${fmt(b.score, 2)}`));
    P.beams.innerHTML = "";
    if (r.beams.length > 1) r.beams.forEach((alt, k) => {
      // an explained caption (a person's words, teacher forced) is marked as such
      const li = el("li", (k === state.beam[mi] ? "on" : "") + (alt.explained ? " explained" : ""),
                    (alt.explained ? "✎ " : "") + alt.words.join(" "));
      li.appendChild(el("span", "lp", `log p ${fmt(alt.score, 2)}`));
      li.addEventListener("click", (ev) => { ev.stopPropagation(); setActive(mi); state.beam[mi] = k; state.word[mi] = 0; fillPanel(mi); });
      P.beams.appendChild(li);
    });
    state.word[mi] = Math.max(0, Math.min(state.word[mi], b.words.length - 1));
    draw(mi, state.word[mi]);
  }

  function setActive(mi) {
    state.active = mi;
    panels.forEach((P, i) => P && P.p.classList.toggle("active", i === mi));
  }

  function setWord(mi, t) {
    const r = data.images[state.image].results[mi];
    if (!r) return;
    const n = r.beams[state.beam[mi]].words.length;
    state.word[mi] = Math.max(0, Math.min(n - 1, t));
    draw(mi, state.word[mi]);
  }

  function draw(mi, t) {
    const im = data.images[state.image], r = im.results[mi], P = panels[mi], m = models[mi];
    const b = r.beams[state.beam[mi]];
    const [gh, gw] = m.grid;
    if (!b.words.length) {  // the model ended the caption at once: no word, no map
      P.heat.width = P.heat.height = 1;
      P.heat.getContext("2d").clearRect(0, 0, 1, 1);
      P.marks.getContext("2d").clearRect(0, 0, P.marks.width, P.marks.height);
      P.refs.innerHTML = "";
      P.info.textContent = "empty caption: the model ended it before any word";
      shown[mi] = { image: state.image, model: mi, beam: state.beam[mi], word: -1, text: "", map: [], peak: -1, refBoxes: [] };
      return;
    }
    const maps = beamMaps(b, m.grid);
    const map = maps[t];
    const smooth = state.style === "smooth";
    paintHeat(P.heat, heatmap(map, gh, gw, r.h, r.w, smooth), r.w, r.h);
    P.stage.classList.toggle("cells", !smooth);
    P.heat.dataset.word = t;
    drawMarks(P, r, m, b, t, map);
    const g = b.grounding ? b.grounding[t] : null;
    drawRefs(P, r, g);
    for (const s of P.words.children) s.classList.toggle("on", +s.dataset.word === t);
    let peak = 0;
    for (let i = 1; i < map.length; i++) if (map[i] > map[peak]) peak = i;
    P.info.innerHTML = "";
    P.info.appendChild(el("b", "", b.words[t]));
    let txt = ` · word ${t + 1}/${b.words.length} · β ${fmt(b.beta[t], 3)} · peak α ${fmt(map[peak], 3)} at cell (${Math.floor(peak / gw)}, ${peak % gw})`;
    if (b.boxes) {
      const bx = b.boxes[t];
      txt += ` · crop (${bx.map((v) => Math.round(v)).join(", ")})`;
    }
    if (g) txt += ` · on its reference boxes ${fmt(g.correctness, 2)} (uniform ${fmt(g.uniform, 2)}), peak ${g.pointing ? "inside" : "outside"}`;
    if (b.logp) txt += ` · log p ${fmt(b.logp[t], 2)}, rank ${b.rank[t]}`;
    if (b.unknown_at && b.unknown_at.includes(t)) txt += " · not in the vocabulary (fed as <unk>)";
    P.info.appendChild(document.createTextNode(txt));
    shown[mi] = { image: state.image, model: mi, beam: state.beam[mi], word: t,
                  text: b.words[t], map: Array.from(map), peak: peak,
                  refBoxes: g ? g.boxes : [], correctness: g ? g.correctness : null };
  }

  function drawRefs(P, r, g) {
    // The reference boxes (human, Flickr30k Entities) of the thing the word names, in the view's
    // pixels like the crop box; as elements placed in percent, so they follow the stage's size.
    P.refs.innerHTML = "";
    if (!g) return;
    for (const [x0, y0, x1, y1] of g.boxes) {
      const d = el("div", "refbox");
      d.style.left = `${100 * x0 / r.w}%`;
      d.style.top = `${100 * y0 / r.h}%`;
      d.style.width = `${100 * (x1 - x0) / r.w}%`;
      d.style.height = `${100 * (y1 - y0) / r.h}%`;
      P.refs.appendChild(d);
    }
  }

  function drawMarks(P, r, m, b, t, map) {
    const c = P.marks;
    const dpr = window.devicePixelRatio || 1;
    const Wd = Math.max(1, Math.round(P.stage.clientWidth * dpr)), Hd = Math.max(1, Math.round(P.stage.clientHeight * dpr));
    c.width = Wd;
    c.height = Hd;
    const ctx = c.getContext("2d");
    const [gh, gw] = m.grid;
    const sx = Wd / r.w, sy = Hd / r.h;
    if (state.grid) {
      ctx.strokeStyle = "rgba(255,255,255,0.35)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let j = 1; j < gw; j++) { const x = Math.round(j * Wd / gw) + 0.5; ctx.moveTo(x, 0); ctx.lineTo(x, Hd); }
      for (let i = 1; i < gh; i++) { const y = Math.round(i * Hd / gh) + 0.5; ctx.moveTo(0, y); ctx.lineTo(Wd, y); }
      ctx.stroke();
      // the attended cell (argmax, or the sampled one for hard attention)
      const loc = b.loc[t];
      const i = Math.floor(loc / gw), j = loc % gw;
      ctx.setLineDash([4 * dpr, 3 * dpr]);
      ctx.strokeStyle = "rgba(255,255,255,0.9)";
      ctx.strokeRect(j * Wd / gw + 1, i * Hd / gh + 1, Wd / gw - 2, Hd / gh - 2);
      ctx.setLineDash([]);
    }
    if (b.boxes) {  // hard attention: the crop the context came from
      const [x0, y0, x1, y1] = b.boxes[t];
      for (const [col, w] of [["#000", 4], ["#fff", 2]]) {
        ctx.strokeStyle = col;
        ctx.lineWidth = w * dpr;
        ctx.strokeRect(x0 * sx + 2, y0 * sy + 2, (x1 - x0) * sx - 4, (y1 - y0) * sy - 4);
      }
    }
  }

  function redrawAll() {
    panels.forEach((P, mi) => { if (P) draw(mi, state.word[mi]); });
  }

  // ---------------------------------------------------------------- keyboard and controls

  function stepImage(d) {
    if (!state.order.length) return;
    let pos = state.order.indexOf(state.image);
    pos = pos < 0 ? 0 : Math.max(0, Math.min(state.order.length - 1, pos + d));
    if (state.order[pos] !== state.image) select(state.order[pos]);
  }

  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    const typing = t && (t.tagName === "SELECT" || t.tagName === "TEXTAREA" ||
      (t.tagName === "INPUT" && !["radio", "checkbox", "file"].includes(t.type)));
    if (typing || ev.altKey || ev.ctrlKey || ev.metaKey || state.image < 0) return;
    const mi = state.active;
    switch (ev.key) {
      case "ArrowLeft": setWord(mi, state.word[mi] - 1); break;
      case "ArrowRight": setWord(mi, state.word[mi] + 1); break;
      case "ArrowUp": stepImage(-1); break;
      case "ArrowDown": stepImage(1); break;
      case "m": setActive((mi + 1) % models.length); break;
      case "s": setStyle(state.style === "smooth" ? "cells" : "smooth"); break;
      case "g": $("grid").checked = !$("grid").checked; state.grid = $("grid").checked; redrawAll(); break;
      default: return;
    }
    ev.preventDefault();  // arrows would scroll the page or move the radio buttons
  });

  function setStyle(s) {
    state.style = s;
    for (const r of document.querySelectorAll('input[name="style"]')) r.checked = r.value === s;
    redrawAll();
  }
  for (const r of document.querySelectorAll('input[name="style"]')) r.addEventListener("change", () => setStyle(r.value));
  $("grid").addEventListener("change", () => { state.grid = $("grid").checked; redrawAll(); });
  $("sort").addEventListener("change", () => { buildList(); if (state.order.length) select(state.order[0]); });
  $("filter").addEventListener("input", () => { buildList(); });
  window.addEventListener("resize", redrawAll);

  // ---------------------------------------------------------------- serve mode: upload a photo

  function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = false; }
  function hideError() { $("error").hidden = true; $("error").textContent = ""; }

  async function upload(file) {
    hideError();
    if (!file) return;
    if (file.size > data.max_upload) {
      showError(`${file.name} is ${mb(file.size)}: this server takes images up to ${mb(data.max_upload)}.`);
      return;
    }
    $("status").textContent = `captioning ${file.name} …`;
    let res, body;
    try {
      // the raw bytes are the body: no multipart form to parse on the server
      res = await fetch("caption", { method: "POST", body: file, headers: {
        "Content-Type": file.type || "application/octet-stream",
        "X-Filename": encodeURIComponent(file.name) } });
      body = await res.json();
    } catch (e) {
      $("status").textContent = "";
      showError(`No answer from the server for ${file.name} (${e.message}). Is showattend serve still running?`);
      return;
    }
    $("status").textContent = "";
    if (!res.ok || body.error) { showError(body.error || `the server answered ${res.status}`); return; }
    data.images.push(body.image);
    sortOptions();
    buildList();
    select(data.images.length - 1);
    $("status").textContent = `${file.name}: captioned in ${fmt(body.seconds, 2)} s`;
  }

  async function explain(text) {
    hideError();
    const im = data.images[state.image];
    if (!im || !im.key || !text.trim()) return;
    $("status").textContent = "explaining …";
    let res, body;
    try {
      res = await fetch("explain", { method: "POST", body: JSON.stringify({ key: im.key, text }),
                                     headers: { "Content-Type": "application/json" } });
      body = await res.json();
    } catch (e) {
      $("status").textContent = "";
      showError(`No answer from the server (${e.message}). Is showattend serve still running?`);
      return;
    }
    $("status").textContent = "";
    if (!res.ok || body.error) { showError(body.error || `the server answered ${res.status}`); return; }
    body.beams.forEach((b, mi) => {
      const r = im.results[mi];
      if (!r) return;
      r.beams.push(b);
      state.beam[mi] = r.beams.length - 1;
      state.word[mi] = 0;
      fillPanel(mi);
    });
    const unk = body.beams.length ? body.beams[0].unknown : [];
    $("status").textContent = `explained in ${fmt(body.seconds, 2)} s` +
      (unk.length ? ` · not in the vocabulary, fed as <unk>: ${unk.join(", ")}` : "");
  }

  function setupUpload() {
    $("explain").addEventListener("submit", (e) => { e.preventDefault(); explain($("explain-text").value); });
    $("upload").hidden = false;
    const input = $("file"), drop = $("drop");
    input.addEventListener("change", () => { const f = input.files[0]; input.value = ""; upload(f); });
    // dropping a file anywhere must not navigate away from the page
    for (const ev of ["dragover", "drop"]) document.addEventListener(ev, (e) => e.preventDefault());
    drop.addEventListener("dragover", () => drop.classList.add("over"));
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => { drop.classList.remove("over"); upload(e.dataTransfer.files[0]); });
  }

  // ---------------------------------------------------------------- start

  header();
  sortOptions();
  if (data.mode === "serve") setupUpload();
  buildList();
  if (data.images.length) select(state.order.length ? state.order[0] : 0);
  else {
    $("empty").hidden = false;
    $("empty").textContent = data.mode === "serve" ? "No photo yet: drop one above or choose a file." : "This report has no images.";
    $("refs-box").hidden = true;
  }
  window.showattend = { data, state, shown, select, setWord, setStyle };
})();
