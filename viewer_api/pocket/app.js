"use strict";
(function () {
  const T = {
    en: {codeTitle: "Enter the access code", codeHelp: "The 6-digit code is printed on your report.", open: "Open",
      report: "Report", download: "Download original DICOM", pdf: "Open the report (PDF)", loading: "Loading…",
      wrong: "Wrong code", locked: "Too many wrong codes. Try again later.", gone: "This link no longer opens.",
      missing: "No such link.", failed: "Could not load. Check the connection and try again.",
      default: "Default", lung: "Lung", mediastinum: "Mediastinum", bone: "Bone", brain: "Brain",
      sex: {M: "Male", F: "Female", O: "Other"}, images: "images",
      age: (a) => a.replace(/^(\d+)Y$/, "$1 y").replace(/^(\d+)M$/, "$1 mo")},
    zh: {codeTitle: "请输入查阅码", codeHelp: "6 位查阅码印在您的报告单上。", open: "打开",
      report: "报告", download: "下载原始 DICOM", pdf: "打开报告 (PDF)", loading: "加载中…",
      wrong: "查阅码错误", locked: "错误次数过多，请稍后再试。", gone: "此链接已失效。",
      missing: "链接不存在。", failed: "加载失败，请检查网络后重试。",
      default: "默认", lung: "肺窗", mediastinum: "纵隔窗", bone: "骨窗", brain: "脑窗",
      sex: {M: "男", F: "女", O: "其他"}, images: "幅",
      age: (a) => a.replace(/^(\d+)Y$/, "$1岁").replace(/^(\d+)M$/, "$1个月")},
  };
  const lang = (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
  const t = T[lang];
  document.documentElement.lang = lang;
  const base = location.pathname.replace(/\/+$/, "");
  const $ = (id) => document.getElementById(id);
  const say = (text) => { $("message").textContent = text || ""; };
  document.querySelectorAll("[data-t]").forEach((el) => { el.textContent = t[el.dataset.t]; });

  let study = null, series = 0, image = 0, preset = "", size = 512;
  const view = {s: 1, x: 0, y: 0};

  async function start() {
    say(t.loading);
    let response;
    try { response = await fetch(base + "/study", {credentials: "same-origin"}); }
    catch (e) { say(t.failed); return; }
    if (response.status === 401) { say(""); $("code").hidden = false; $("code-input").focus(); return; }
    if (response.status === 410) { say(t.gone); return; }
    if (!response.ok) { say(response.status === 404 ? t.missing : t.failed); return; }
    study = await response.json();
    say("");
    $("code").hidden = true;
    $("study").hidden = false;
    show();
  }

  $("code").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = new URLSearchParams({code: $("code-input").value});
    const response = await fetch(base + "/code", {method: "POST", body, credentials: "same-origin"});
    if (response.status === 204) { $("code-error").textContent = ""; start(); return; }
    let detail = "";
    try { detail = (await response.json()).detail || ""; } catch (e) { /* a body that is not JSON */ }
    const remaining = /(\d+) tries left/.exec(detail);
    $("code-error").textContent = response.status === 429 ? t.locked
      : t.wrong + (remaining ? ` (${remaining[1]})` : "");
    $("code-input").select();
  });

  function show() {
    const p = study.patient, s = study.study;
    $("patient").textContent = p.name;
    $("facts").textContent = [t.sex[p.sex] || p.sex, t.age(p.age), s.date, s.modalities.join("/"),
      s.body_parts.join("/"), s.institution].filter(Boolean).join(" · ");
    document.title = [p.name, s.date].filter(Boolean).join(" ");
    const strip = $("strip");
    strip.textContent = "";
    study.series.forEach((item, index) => {
      const button = document.createElement("button");
      button.type = "button";
      const thumb = document.createElement("img");
      thumb.src = `${base}/series/${index}/thumbnail`;
      thumb.alt = "";
      thumb.width = thumb.height = 80;
      const label = document.createElement("span");
      label.textContent = `${item.modality} ${item.description || item.number || ""}`.trim() + ` · ${item.images}`;
      button.append(thumb, label);
      button.addEventListener("click", () => choose(index));
      strip.append(button);
    });
    if (study.download) { const a = $("download"); a.href = `${base}/${study.download}`; a.hidden = false; }
    showReports();
    const need = $("stage").clientWidth * (window.devicePixelRatio || 1);
    size = study.sizes.find((s) => s >= need && s <= 768) || Math.min(768, study.sizes[study.sizes.length - 1]);
    if (study.series.length) choose(0);
  }

  async function showReports() {
    const links = $("report-links");
    links.textContent = "";
    for (const report of study.reports) {
      $("report").hidden = false;
      if (report.kind === "pdf") {
        const a = document.createElement("a");
        a.href = `${base}/${report.url}`;
        a.textContent = t.pdf;
        a.target = "_blank";
        a.rel = "noopener";
        links.append(a);
      } else {
        const response = await fetch(`${base}/${report.url}`, {credentials: "same-origin"});
        if (response.ok) $("report-text").textContent += (await response.json()).text + "\n";
      }
    }
  }

  function choose(index) {
    series = index;
    image = Math.floor((study.series[index].images - 1) / 2);
    preset = "";
    [...$("strip").children].forEach((b, i) => b.setAttribute("aria-pressed", String(i === index)));
    const presets = $("presets");
    presets.textContent = "";
    const names = study.series[index].presets;
    if (names.length) {
      ["", ...names].forEach((name) => {
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.preset = name;
        button.textContent = t[name || "default"];
        button.setAttribute("aria-pressed", String(name === preset));
        button.addEventListener("click", () => {
          preset = name;
          [...presets.children].forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.preset === name)));
          go(image);
        });
        presets.append(button);
      });
    }
    $("scrub").max = String(study.series[index].images - 1);
    reset();
    go(image);
  }

  const url = (j) => `${base}/series/${series}/images/${j}?size=${size}` + (preset ? `&preset=${preset}` : "");
  const preloaded = new Map();
  function go(j) {
    const count = study.series[series].images;
    image = Math.max(0, Math.min(count - 1, j));
    $("slice").src = url(image);
    $("scrub").value = String(image);
    $("position").textContent = `${image + 1} / ${count}`;
    for (const k of [image + 1, image - 1, image + 2, image - 2]) {
      if (k < 0 || k >= count) continue;
      const next = url(k);
      if (!preloaded.has(next)) { const img = new Image(); img.src = next; preloaded.set(next, img); }
    }
    if (preloaded.size > 64) preloaded.delete(preloaded.keys().next().value);
  }
  $("scrub").addEventListener("input", (e) => go(Number(e.target.value)));
  document.addEventListener("keydown", (e) => {
    if (!study) return;
    if (e.key === "ArrowDown" || e.key === "ArrowRight") go(image + 1);
    if (e.key === "ArrowUp" || e.key === "ArrowLeft") go(image - 1);
  });

  // Gestures: one finger drags through the slices (or pans once zoomed), two pinch, a double tap zooms.
  const stage = $("stage"), slice = $("slice");
  const pointers = new Map();
  let drag = null, pinch = null, lastTap = 0;
  const STEP = 12;
  function apply() {
    const w = stage.clientWidth, h = stage.clientHeight;
    view.x = Math.min(0, Math.max(w - w * view.s, view.x));
    view.y = Math.min(0, Math.max(h - h * view.s, view.y));
    slice.style.transform = `translate(${view.x}px,${view.y}px) scale(${view.s})`;
    stage.dataset.zoom = view.s.toFixed(2);
  }
  function reset() { view.s = 1; view.x = 0; view.y = 0; apply(); }
  function zoomAt(scale, cx, cy) {
    const s = Math.max(1, Math.min(8, scale));
    view.x = cx - (cx - view.x) * (s / view.s);
    view.y = cy - (cy - view.y) * (s / view.s);
    view.s = s;
    apply();
  }
  const local = (e) => { const r = stage.getBoundingClientRect(); return {x: e.clientX - r.left, y: e.clientY - r.top}; };
  stage.addEventListener("pointerdown", (e) => {
    stage.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, local(e));
    if (pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      pinch = {d: Math.hypot(a.x - b.x, a.y - b.y) || 1, s: view.s};
      drag = null;
    } else if (pointers.size === 1) {
      drag = {...local(e), start: image, x0: view.x, y0: view.y, moved: false};
    }
  });
  stage.addEventListener("pointermove", (e) => {
    if (!pointers.has(e.pointerId)) return;
    pointers.set(e.pointerId, local(e));
    if (pinch && pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      zoomAt(pinch.s * Math.hypot(a.x - b.x, a.y - b.y) / pinch.d, (a.x + b.x) / 2, (a.y + b.y) / 2);
    } else if (drag) {
      const p = local(e), dx = p.x - drag.x, dy = p.y - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 4) drag.moved = true;
      if (view.s > 1) { view.x = drag.x0 + dx; view.y = drag.y0 + dy; apply(); }
      else go(drag.start - Math.round(dx / STEP));
    }
  });
  function up(e) {
    if (!pointers.has(e.pointerId)) return;
    const p = pointers.get(e.pointerId);
    pointers.delete(e.pointerId);
    if (pointers.size < 2) pinch = null;
    if (drag && !drag.moved && pointers.size === 0) {
      const now = Date.now();
      if (now - lastTap < 350) { if (view.s > 1) reset(); else zoomAt(2.5, p.x, p.y); lastTap = 0; }
      else lastTap = now;
    }
    if (pointers.size === 0) drag = null;
  }
  stage.addEventListener("pointerup", up);
  stage.addEventListener("pointercancel", up);
  stage.addEventListener("wheel", (e) => { e.preventDefault(); const p = local(e); zoomAt(view.s * (e.deltaY < 0 ? 1.2 : 1 / 1.2), p.x, p.y); }, {passive: false});

  start();
})();
