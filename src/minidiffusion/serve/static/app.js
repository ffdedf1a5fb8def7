// minidiffusion's page: reads the models from /api/models, posts settings to /api/generate and draws the
// server-sent events it streams back (queued, start, preview..., done | error). Plain JS, no build step.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const FIELDS = ["guidance", "steps", "sampler", "seed", "n", "preview_every", "precision"];
  const STRIP_FRAMES = 10; // frames per image in the film strip (evenly spaced), then the final image
  let catalog = null; // the /api/models answer
  let controller = null; // the AbortController of the request in flight
  let frames = []; // frames[k] = [{step, src}] for image k
  // A debugging aid (and what the browser test reads): the event types of the last request, in order.
  window.minidiffusionLog = [];

  // A <figure> holding `el`, with `caption` under it when one is given.
  function figure(el, caption) {
    const fig = document.createElement("figure");
    fig.append(el);
    if (caption !== undefined) {
      const c = document.createElement("figcaption");
      c.textContent = caption;
      fig.append(c);
    }
    return fig;
  }

  // Each media type's renderer: the extension point for models that make something else (audio: <audio>).
  const RENDER = {
    image(src, caption, cls) {
      const img = document.createElement("img");
      img.src = src;
      img.alt = caption || "";
      if (cls) img.className = cls;
      return figure(img, caption);
    },
    // A sound: a player, and its caption.
    audio(src, caption) {
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.src = src;
      return figure(audio, caption);
    },
    // A media type without its own renderer: a link to the item.
    other(src, caption) {
      const a = document.createElement("a");
      a.href = src;
      a.download = "";
      a.textContent = caption || "download";
      return figure(a);
    },
  };
  const renderer = (media) => RENDER[media] || RENDER.other;

  function model() {
    return catalog.models.find((m) => m.name === $("model").value);
  }

  function showError(text) {
    $("error").hidden = !text;
    $("error").textContent = text || "";
  }

  function setStatus(state, text) {
    $("status").dataset.state = state;
    $("status").textContent = text;
  }

  function fill(select, values, labels) {
    select.replaceChildren(...values.map((v, i) => new Option(labels ? labels[i] : v, v)));
  }

  // The shared controls a model takes (an upscaler takes no guidance, label or image count).
  const controls = (m) => m.controls || FIELDS;

  function chooseModel() {
    const m = model();
    for (const el of document.querySelectorAll("[data-input]")) el.hidden = !m.inputs.includes(el.dataset.input);
    for (const el of document.querySelectorAll("[data-control]")) {
      el.hidden = !controls(m).includes(el.dataset.control);
    }
    $("init-image-label").textContent = m.kind === "upscale" ? "Image to upscale" : "Init image (image-to-image)";
    fill($("label"), ["", ...m.classes], ["all classes (balanced)", ...m.classes]);
    const schedules = m.schedules || [];
    fill($("schedule"), ["", ...schedules], ["the model's own", ...schedules]);
    const d = m.defaults;
    for (const k of ["sampler", "steps", "guidance", "n", "precision"]) if (d[k] !== undefined) $(k).value = d[k];
    if (d.strength !== undefined) $("strength").value = d.strength;
    $("strength-out").textContent = $("strength").value;
    $("model-info").textContent = m.kind === "upscale"
      ? `upscaler x${m.scale} (${m.diffusion ? `diffusion, ${d.steps} steps` : "one pass"}), images up to ` +
        `${m.max_side}x${m.max_side} px, on ${m.device}`
      : `${m.kind}, ${m.image_size}x${m.image_size} px, on ${m.device}` +
        (m.classes.length ? `, ${m.classes.length} classes` : "");
  }

  async function loadModels() {
    const r = await fetch("/api/models");
    catalog = await r.json();
    const usable = catalog.models.filter((m) => !m.error);
    fill($("model"), usable.map((m) => m.name));
    fill($("sampler"), catalog.samplers);
    fill($("precision"), catalog.precisions);
    const broken = catalog.models.filter((m) => m.error);
    if (broken.length) showError(broken.map((m) => m.error).join(" "));
    if (!usable.length) {
      setStatus("error", "No model can be served.");
      $("generate").disabled = true;
      return;
    }
    chooseModel();
  }

  // A number field goes as a number when it reads as one, else as typed (the server names the problem).
  function number(id, integer) {
    const text = $(id).value.trim();
    if (text === "") return null;
    const re = integer ? /^-?\d+$/ : /^-?(\d+\.?\d*|\.\d+)(e-?\d+)?$/i;
    return re.test(text) ? Number(text) : text;
  }

  function collect() {
    const m = model();
    const s = { model: m.name };
    if (m.inputs.includes("label") && $("label").value !== "") s.label = $("label").value;
    if (m.inputs.includes("prompt")) s.prompt = $("prompt").value;
    if (m.inputs.includes("negative_prompt") && $("negative_prompt").value !== "") {
      s.negative_prompt = $("negative_prompt").value;
    }
    s.sampler = $("sampler").value;
    if (m.inputs.includes("schedule") && $("schedule").value !== "") s.schedule = $("schedule").value;
    s.steps = number("steps", true);
    s.guidance = number("guidance", false);
    s.n = number("n", true);
    const seed = $("seed").value.trim();
    s.seed = seed === "" ? null : seed; // as typed: digits stay exact past 2**53, anything else the server names
    s.preview_every = number("preview_every", true);
    s.precision = $("precision").value;
    const file = m.inputs.includes("init_image") ? $("init_image").files[0] : undefined;
    if (file && m.inputs.includes("strength")) s.strength = Number($("strength").value);
    for (const k of ["steps", "guidance", "n", "preview_every"]) if (s[k] === null) delete s[k];
    for (const k of FIELDS) if (!controls(m).includes(k)) delete s[k]; // what this model does not take
    return { settings: s, file };
  }

  function setupTiles(n, captions) {
    frames = Array.from({ length: n }, () => []);
    const tiles = $("tiles");
    tiles.replaceChildren();
    for (let k = 0; k < n; k++) {
      const fig = RENDER.image("data:,", captions[k] || "", "preview");
      fig.dataset.caption = captions[k] || "";
      fig.querySelector("img").removeAttribute("src");
      tiles.append(fig);
    }
  }

  function onPreview(p, started) {
    const figs = $("tiles").children;
    p.images.forEach((src, j) => {
      const k = p.first + j;
      if (!figs[k]) return;
      figs[k].querySelector("img").src = src;
      const caption = figs[k].dataset.caption;
      figs[k].querySelector("figcaption").textContent = (caption ? `${caption} · ` : "") + `step ${p.step}/${p.steps}`;
      frames[k].push({ step: p.step, src });
    });
    $("progress").max = p.steps;
    $("progress").value = p.step;
    const first = window.minidiffusionLog.filter((e) => e === "preview").length === 1;
    if (first) $("status").dataset.firstPreview = p.elapsed.toFixed(2);
    setStatus("denoising", `Denoising: step ${p.step} of ${p.steps}` +
      (p.first || started.per_image ? ` (image ${p.first + 1})` : "") +
      ` · first preview after ${$("status").dataset.firstPreview} s`);
  }

  function download(name, href) {
    const a = document.createElement("a");
    a.href = href;
    a.download = name;
    a.textContent = `Download ${name}`;
    return a;
  }

  function filmstrip(done) {
    const box = $("filmstrip");
    box.replaceChildren();
    frames.forEach((list, k) => {
      const row = document.createElement("div");
      row.className = "strip";
      const pick = list.length <= STRIP_FRAMES ? list :
        Array.from({ length: STRIP_FRAMES }, (_, i) => list[Math.round(i * (list.length - 1) / (STRIP_FRAMES - 1))]);
      for (const f of pick) row.append(RENDER.image(f.src, `step ${f.step}`));
      row.append(renderer(done.media)(done.images[k], "final", "final"));
      box.append(row);
    });
  }

  function onDone(d) {
    const render = renderer(d.media);
    $("tiles").replaceChildren(...d.images.map((src, k) => render(src, d.captions[k], "final")));
    const s = d.settings;
    const base = `minidiffusion-${s.model}-seed${s.seed}`;
    const links = [];
    for (const [name, href] of Object.entries(d.files)) {
      links.push(download(name === "grid.png" ? `${base}.png` : name === "samples.npz" ? `${base}.npz` : name, href));
    }
    const blob = new Blob([d.settings_text + "\n"], { type: "application/json" });
    links.push(download(`${base}.json`, URL.createObjectURL(blob)));
    $("downloads").replaceChildren(...links);
    $("settings-out").textContent = d.settings_text;
    $("command").textContent = d.command || "(a model given to the server directly: no command line)";
    $("command").hidden = false;
    filmstrip(d);
    $("results").hidden = false;
    $("progress").value = $("progress").max;
    const first = d.first_preview_seconds === null ? "" : `, first preview after ${d.first_preview_seconds.toFixed(2)} s`;
    setStatus("done", `Done: ${d.images.length} ${d.media === "audio" ? "sound" : "image"}(s) in ${d.seconds.toFixed(2)} s${first}` +
      `, ${d.previews} preview(s).`);
    $("seed").value = String(seedOf(d.settings_text));
  }

  // The seed as the server wrote it (JSON.parse would round seeds past 2**53).
  function seedOf(text) {
    const m = /"seed"\s*:\s*"?(\d+)"?/.exec(text);
    return m ? m[1] : "";
  }

  function parseEvent(chunk) {
    let event = "message";
    const data = [];
    for (const line of chunk.split("\n")) {
      if (line.startsWith(":")) continue; // a keep-alive comment
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
  }

  async function generate() {
    if (controller) controller.abort();
    showError("");
    window.minidiffusionLog = [];
    const { settings, file } = collect();
    let init;
    if (file) {
      const form = new FormData();
      form.append("settings", JSON.stringify(settings));
      form.append("init_image", file);
      init = { method: "POST", body: form };
    } else {
      init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(settings) };
    }
    controller = new AbortController();
    init.signal = controller.signal;
    $("generate").disabled = true;
    $("stop").disabled = false;
    $("results").hidden = true;
    setStatus("sending", "Sending…");
    let started = {};
    try {
      const r = await fetch("/api/generate", init);
      if (!r.ok) {
        let detail = `HTTP ${r.status}`;
        try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
        showError(detail);
        setStatus("error", r.status === 429 ? "The server is busy." : "The settings were refused.");
        return;
      }
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const ev = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!ev) continue;
          window.minidiffusionLog.push(ev.event);
          if (ev.event === "queued") {
            setStatus("queued", ev.data.position ? `Queued: ${ev.data.position} request(s) ahead…` : "Starting…");
          } else if (ev.event === "start") {
            started = ev.data;
            setupTiles(ev.data.n, ev.data.captions);
            $("progress").max = Math.max(1, ev.data.steps);
            $("progress").value = 0;
            setStatus("denoising", `Denoising: ${ev.data.steps} steps…`);
          } else if (ev.event === "preview") {
            onPreview(ev.data, started);
          } else if (ev.event === "done") {
            onDone(ev.data);
          } else if (ev.event === "error") {
            showError(ev.data.message);
            setStatus("error", "The generation failed.");
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") setStatus("stopped", "Stopped.");
      else { showError(String(e)); setStatus("error", "The connection failed."); }
    } finally {
      controller = null;
      $("generate").disabled = false;
      $("stop").disabled = true;
    }
  }

  function randomSeed() {
    const a = new Uint32Array(2);
    crypto.getRandomValues(a);
    return String((a[0] & 0x1fffff) * 2 ** 32 + a[1]); // below 2**53: exact in JavaScript
  }

  function applySettings() {
    const text = $("settings-in").value;
    let s;
    try { s = JSON.parse(text); } catch (e) { showError(`the settings are not JSON (${e.message})`); return; }
    if (!catalog.models.some((m) => m.name === s.model)) { showError(`unknown model ${JSON.stringify(s.model)}`); return; }
    $("model").value = s.model;
    chooseModel();
    for (const k of FIELDS) if (s[k] !== undefined && s[k] !== null) $(k).value = String(s[k]);
    if (s.seed !== undefined && s.seed !== null) $("seed").value = seedOf(text) || String(s.seed);
    if (s.label !== undefined) $("label").value = s.label === null ? "" : String(s.label);
    if (s.schedule !== undefined) $("schedule").value = s.schedule === null ? "" : s.schedule;
    if (s.prompt !== undefined) $("prompt").value = s.prompt;
    if (s.negative_prompt !== undefined) $("negative_prompt").value = s.negative_prompt || "";
    if (s.strength !== undefined && s.strength !== null) $("strength").value = s.strength;
    $("strength-out").textContent = $("strength").value;
    showError(s.init_image_sha256 ? "These settings were made from an init image: choose it again." : "");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("controls").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
    $("model").addEventListener("change", chooseModel);
    $("stop").addEventListener("click", () => controller && controller.abort());
    $("random-seed").addEventListener("click", () => { $("seed").value = randomSeed(); generate(); });
    $("strength").addEventListener("input", () => { $("strength-out").textContent = $("strength").value; });
    $("clear-init").addEventListener("click", () => { $("init_image").value = ""; });
    $("apply-settings").addEventListener("click", applySettings);
    loadModels().catch((e) => { showError(`cannot read the models (${e})`); setStatus("error", "No models."); });
  });
})();
