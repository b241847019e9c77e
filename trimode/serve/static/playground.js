// The trimode playground: run a prompt in one or two modes over this server's streaming API and show the
// text forming, or an edit (fill a hole, revise a draft) and show its block filling. Plain JavaScript, no
// dependencies; every URL is relative to the page, so it works behind a path prefix. Model output is only ever
// inserted as text (textContent), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const BASE = new URL(".", document.baseURI); // the page is <prefix>/ or <prefix>/playground
  // Until the server's model card arrives (its `modes` and `lossless_modes` come from the mode registry).
  let MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec", "auto"];
  let LOSSLESS = new Set(["ar", "linear_spec", "quadratic_spec", "auto"]); // = AR's output at temperature 0
  // The knobs each mode reads (the server drops the others; steps would be refused outside diffusion).
  const MODE_KNOBS = {
    ar: [],
    diffusion: ["block_length", "threshold", "steps", "unmask"],
    linear_spec: ["block_length", "threshold", "use_drafter", "unmask"],
    quadratic_spec: ["block_length"],
    auto: ["block_length", "use_drafter"],
  };
  const NO_BLOCK = {
    ar: "AR commits one token per forward pass: nothing to denoise.",
    linear_spec: "linear_spec drafts a block by diffusion and verifies it in the next pass: the accepted tokens arrive together, so there is no partial block to show.",
    quadratic_spec: "quadratic_spec verifies and redrafts in one pass: the accepted tokens arrive together.",
    auto: "auto switches between AR and self-speculation per step: accepted tokens arrive together.",
  };
  const COLOURS = 8;
  // The editing controls: what they do, said next to them, and the note under an edit's block.
  const EDIT_HINTS = {
    none: "infill: the model fills a hole between the prompt and a suffix; revise: it rewrites a draft. An edit runs alone.",
    infill: "Infill is a completion with a suffix (v1/completions), so the kind is now completion: the page cannot render chat messages into a prompt. Max tokens is the hole's budget.",
    revise: "Revise (v1/edits): the model rewrites the draft where it would write otherwise; what it changed is highlighted.",
  };
  const EDIT_NOTES = {
    infill: "The hole (masked slots hatched) and the suffix (greyed: given, never changes) are one block; each pass fills some slots. A middle shorter than the hole ends in the empty token, which is stripped; the hole starts a few slots long and doubles while the model fills it to the end.",
    revise: "The draft as one block (greyed: as the model first showed it; highlighted at the end: what changed). Slots the model would write otherwise are masked again (hatched) and refilled, in rounds. The last slot is the open end after the draft, never written.",
  };

  let model = null; // the card from v1/models
  let runs = []; // the runs on screen: {mode, controller, panel, ...}
  let kindBeforeInfill = null; // the kind infill switched away from, set back when it is switched off

  // -- talking to the server ----------------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  class APIError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // An error response as a readable message: the OpenAI-style body's message, else the status line.
  async function apiError(res) {
    let message = `${res.status} ${res.statusText || "error"}`;
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) message = `${res.status}: ${body.error.message}`;
    } catch (_) {
      /* not JSON: keep the status line */
    }
    return new APIError(res.status, message);
  }

  async function loadModel() {
    try {
      const res = await fetch(new URL("v1/models", BASE), { headers: headers() });
      if (!res.ok) throw await apiError(res);
      model = (await res.json()).data[0];
    } catch (e) {
      model = null;
      $("server-info").textContent = "not connected";
      if (e.status === 401) {
        showError(`${e.message}. This server needs an API key: enter it under Connection.`);
        $("connection").open = true;
        $("api-key").focus();
      } else {
        showError(`Cannot reach the server: ${e.message}`);
      }
      return;
    }
    clearError();
    const drafter = model.has_drafter ? "drafter" : "no drafter";
    $("server-info").textContent = `${model.id} · context ${model.context_length} tokens · ${drafter} · default mode ${model.default_mode}`;
    if (model.lossless_modes) LOSSLESS = new Set(model.lossless_modes);
    const modes = model.modes || MODES;
    fillModes($("mode-a"), modes, $("mode-a").value || "ar");
    fillModes($("mode-b"), modes, $("mode-b").value || "linear_spec");
    $("drafter").disabled = !model.has_drafter;
    $("drafter").title = model.has_drafter ? "" : "this model has no drafter adapter";
    if (!model.has_chat_template) {
      kindRadio("completion").checked = true;
      if (kindBeforeInfill !== null) kindBeforeInfill = "completion";
    }
    syncControls();
  }

  function fillModes(select, modes, chosen) {
    select.replaceChildren(...modes.map((m) => new Option(m, m, false, m === chosen)));
  }

  function number(id) {
    const v = $(id).value.trim();
    return v === "" ? null : Number(v);
  }

  function kindRadio(kind) {
    return document.querySelector(`input[name="kind"][value="${kind}"]`);
  }

  function chosenKind() {
    return document.querySelector('input[name="kind"]:checked').value;
  }

  function requestBody(mode) {
    const chat = chosenKind() === "chat";
    const prompt = $("prompt").value;
    const body = { model: model.id, mode, stream: true };
    if (chat) body.messages = [{ role: "user", content: prompt }];
    else body.prompt = prompt;
    const knobs = {
      max_tokens: number("max-tokens"),
      temperature: number("temperature"),
      seed: number("seed"),
      max_thinking_tokens: number("thinking"),
    };
    const reads = MODE_KNOBS[mode] || [];
    const rule = $("rule").value;
    if (reads.includes("block_length")) knobs.block_length = number("block-length");
    if (reads.includes("threshold") && (rule !== "steps" || mode !== "diffusion")) knobs.threshold = number("threshold");
    if (reads.includes("steps") && rule === "steps") knobs.steps = number("steps");
    // The learned sampler (the model's sampler/) commits the slots it scores above the threshold.
    if (reads.includes("unmask") && rule === "learned") knobs.unmask = "learned";
    if (reads.includes("use_drafter") && model.has_drafter) knobs.use_drafter = $("drafter").checked;
    for (const [k, v] of Object.entries(knobs)) if (v !== null) body[k] = v;
    const schema = $("json-schema").value.trim();
    if (schema) body.structured_outputs = { json: schema }; // the server parses it and names what it cannot hold
    if (mode === "diffusion") body.provisional = true; // the block being denoised, after every pass
    return { chat, body };
  }

  // An edit has no mode: infill is a completion with a `suffix` (max tokens: the hole's budget), a revision is
  // v1/edits. Both stream the block as it fills. The texts are the run's, taken when it started.
  function editBody(run) {
    const chat = run.edit === "revise" && chosenKind() === "chat";
    const body = { model: model.id, stream: true, provisional: true };
    if (run.edit === "infill") {
      Object.assign(body, { prompt: run.prompt, suffix: run.suffix, max_tokens: number("max-tokens") });
    } else {
      Object.assign(body, { kind: "revise", draft: run.draft });
      if (chat) body.messages = [{ role: "user", content: run.prompt }];
      else body.prompt = run.prompt;
    }
    const knobs = {
      temperature: number("temperature"),
      seed: number("seed"),
      threshold: $("rule").value === "threshold" ? number("threshold") : null,
    };
    for (const [k, v] of Object.entries(knobs)) if (v !== null) body[k] = v;
    for (const [k, v] of Object.entries(body)) if (v === null) delete body[k];
    return { chat, body };
  }

  // Read the SSE stream, calling onData for each `data:` payload.
  async function readEvents(res, onData) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }

  async function execute(run) {
    const { chat, body } = run.edit ? editBody(run) : requestBody(run.mode);
    run.chat = chat;
    run.sampled = body.temperature > 0 && body.seed === undefined; // then even lossless modes may differ
    const path = run.edit === "revise" ? "v1/edits" : chat ? "v1/chat/completions" : "v1/completions";
    const res = await fetch(new URL(path, BASE), { method: "POST", headers: headers(), body: JSON.stringify(body), signal: run.controller.signal });
    if (!res.ok) throw await apiError(res);
    let finished = false;
    await readEvents(res, (data) => {
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new APIError(0, obj.error.message); // an error after the stream started
      if (obj.object === "edit.chunk") { // v1/edits: the block at the top level, the answer in the last chunk
        if (obj.provisional) onProvisional(run, obj.provisional, obj.trimode || {});
        const answer = obj.choices && obj.choices[0];
        if (answer) {
          finished = true;
          onRevised(run, answer.text, answer.spans || [], obj.trimode || {});
          onFinish(run, obj.trimode || {}, answer.finish_reason);
        }
        return;
      }
      const choice = obj.choices && obj.choices[0];
      if (!choice) return; // the usage chunk
      const extra = choice.trimode || {};
      if (choice.provisional) onProvisional(run, choice.provisional, extra);
      const text = (chat ? choice.delta && choice.delta.content : choice.text) || "";
      if (text || extra.token_ids) onCommit(run, text, extra.token_ids || [], extra);
      if (choice.finish_reason) {
        finished = true;
        onFinish(run, (obj.trimode && obj.trimode.choice) || obj.trimode || {}, choice.finish_reason);
      }
    });
    if (!finished) throw new APIError(0, "the stream ended before the generation finished");
  }

  // -- one run's panel ----------------------------------------------------------------------------------------
  function newRun(mode) {
    const panel = $("panel-template").content.firstElementChild.cloneNode(true);
    panel.dataset.mode = mode;
    const q = (cls) => panel.querySelector("." + cls);
    q("mode").textContent = mode;
    const run = {
      mode, panel, q, controller: new AbortController(), state: "running", text: "",
      tokens: 0, commits: 0, steps: 0, forwards: 0, exact: false, block: null, final: null,
      started: performance.now(), ended: null, edit: EDIT_NOTES[mode] ? mode : null,
    };
    if (run.edit) {
      run.prompt = $("prompt").value;
      run.suffix = $("suffix").value;
      run.draft = $("draft").value;
      // The text: (infill) the prefix and suffix greyed around the middle, which shows the hole while it fills.
      run.middle = document.createElement("span");
      run.middle.className = "middle";
      run.filling = true;
      if (run.edit === "infill") q("text").append(given(run.prompt, "prefix"), run.middle, given(run.suffix, "suffix"));
      else q("text").append(run.middle);
      q("text-hint").textContent = run.edit === "infill"
        ? "(prefix and suffix greyed; the middle coloured by the pass that wrote it)"
        : "(highlighted: what the revision changed)";
      q("block-heading").textContent = run.edit === "infill" ? "Block being filled" : "Block being revised";
      q("block-note").textContent = EDIT_NOTES[run.edit];
    } else if (mode === "diffusion") {
      q("block-note").textContent = "Masked slots are hatched; each pass fills some in (outlined: filled by the latest pass).";
    } else {
      q("block").hidden = true;
      q("block-note").textContent = NO_BLOCK[mode] || "";
    }
    setState(run, "running");
    return run;
  }

  function given(text, what) {
    const span = document.createElement("span");
    span.className = "given";
    span.textContent = text;
    span.title = `the ${what}: given`;
    return span;
  }

  function setState(run, state, detail) {
    run.state = state;
    run.panel.dataset.state = state;
    run.q("state").textContent = detail ? `${state}: ${detail}` : state;
  }

  // The colour index of what a pass commits now: the forward pass when the server reports it, else the
  // denoising pass (diffusion, edits) or the commit (each commit of the other modes is one verifying pass).
  function passIndex(run) {
    if (run.exact) return run.forwards;
    return run.mode === "diffusion" || run.edit ? run.steps : run.commits;
  }

  function onCommit(run, text, ids, extra) {
    run.tokens += ids.length;
    if (ids.length) run.commits += 1;
    if (extra.forward_passes != null) {
      run.forwards = extra.forward_passes;
      run.exact = true;
    } else if (!run.exact) {
      run.forwards = Math.max(run.forwards, run.mode === "diffusion" ? 1 + run.steps : run.commits);
    }
    const pass = passIndex(run);
    run.text += text;
    if (run.filling) { // the middle is final: it replaces the hole as it was filling
      run.middle.replaceChildren();
      run.filling = false;
    }
    if (text) {
      const span = document.createElement("span");
      span.textContent = text;
      span.className = "c" + (pass % COLOURS);
      span.title = `pass ${pass}: ${ids.length} token${ids.length === 1 ? "" : "s"} (ids ${ids.join(" ")})`;
      (run.middle || run.q("text")).append(span);
    }
    if (ids.length) commitBar(run, ids.length, pass);
    updateFigures(run);
  }

  function commitBar(run, tokens, pass) {
    const bar = document.createElement("span");
    bar.className = "commit c" + (pass % COLOURS);
    bar.style.flexGrow = String(tokens);
    bar.textContent = String(tokens);
    bar.title = `pass ${pass}: ${tokens} token${tokens === 1 ? "" : "s"}`;
    run.q("commits").append(bar);
  }

  // A revision's answer: the whole revised draft, the character ranges it changed marked.
  function onRevised(run, text, spans, stats) {
    if (stats.forward_passes != null) {
      run.forwards = stats.forward_passes;
      run.exact = true;
    }
    const chars = Array.from(text); // spans count characters (code points), as Python does
    const parts = [];
    let at = 0;
    for (const [start, end] of [...spans].sort((a, b) => a[0] - b[0])) {
      if (start > at) parts.push(chars.slice(at, start).join(""));
      const mark = document.createElement("mark");
      mark.textContent = chars.slice(start, end).join("");
      mark.title = `changed by the revision (characters ${start}-${end})`;
      parts.push(mark);
      at = Math.max(at, end);
    }
    if (at < chars.length) parts.push(chars.slice(at).join(""));
    run.text = text;
    run.filling = false;
    run.middle.replaceChildren(...parts);
    markChangedSlots(run, text, spans);
    if (stats.generated_tokens) commitBar(run, stats.generated_tokens, passIndex(run));
  }

  // The block's slots inside a changed range get the same highlight (when the slots spell the text exactly).
  function markChangedSlots(run, text, spans) {
    const slots = run.q("block").children;
    const pieces = (run.block || []).slice(0, -1).map((c) => c.piece); // the open end aside
    if (!pieces.length || pieces.some((p) => p === null) || pieces.join("") !== text) return;
    let at = 0;
    pieces.forEach((piece, i) => {
      const start = at;
      at += Array.from(piece).length;
      if (spans.some(([s, e]) => s < at && e > start)) slots[i].classList.add("changed");
    });
  }

  function visible(piece) {
    if (piece === "") return "∅";
    return piece.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  }

  function onProvisional(run, prov, extra) {
    run.steps += 1;
    if (extra.forward_passes != null) {
      run.forwards = extra.forward_passes;
      run.exact = true;
    } else if (!run.exact) {
      run.forwards = Math.max(run.forwards, 1 + run.steps); // the prefill, then one pass per step
    }
    const ids = prov.token_ids;
    const pieces = extra.pieces || ids.map((t) => (t === null ? null : `#${t}`));
    const old = run.block;
    // A new diffusion block: another length, the last one full, or a slot masked again. An edit keeps its
    // block (slots masked again are refilled in place) unless its hole grows.
    const fresh = !old || old.length !== ids.length || (!run.edit && (old.every((c) => c.id !== null) ||
      old.some((c, i) => c.id !== null && ids[i] === null)));
    if (fresh) run.block = ids.map(() => ({ id: null, piece: null, pass: null, forced: false }));
    const forced = prov.forced || []; // under a grammar: the slots it forced (given tokens, no forward pass)
    const pass = passIndex(run);
    const asRead = fresh && run.edit === "revise"; // the draft's first state: not told apart from what it was
    ids.forEach((t, i) => {
      const cell = run.block[i];
      if (t !== null && cell.id !== t) cell.pass = asRead ? null : pass;
      cell.id = t;
      cell.piece = pieces[i];
      cell.forced = t !== null && Boolean(forced[i]);
    });
    // An edit's given slots: the suffix of an infill (its last slots), the open end of a revision (the last).
    const givenFrom = run.edit === "infill" ? ids.length - suffixSlots(pieces, run.suffix) : ids.length;
    const openAt = run.edit === "revise" ? ids.length - 1 : -1;
    const cells = run.block.map((c, i) => {
      const el = document.createElement("span");
      if (i === openAt) {
        el.className = "cell open";
        el.title = "the open end after the draft: never written";
      } else if (c.id === null) {
        el.className = "cell mask";
        el.title = "masked";
      } else if (c.forced) {
        el.className = "cell forced";
        el.textContent = visible(c.piece === null ? "" : c.piece);
        el.title = `token ${c.id}, forced by the grammar: written without a forward pass`;
      } else if (i >= givenFrom || c.pass === null) {
        el.className = "cell given";
        el.textContent = visible(c.piece === null ? "" : c.piece);
        el.title = `token ${c.id}, ${i >= givenFrom ? "the suffix: given" : "the draft"}`;
      } else {
        el.className = "cell c" + (c.pass % COLOURS) + (c.pass === pass ? " new" : "");
        el.textContent = visible(c.piece === null ? "" : c.piece);
        el.title = `token ${c.id}, filled by pass ${c.pass}`;
      }
      return el;
    });
    const filled = run.block.filter((c) => c.id !== null).length;
    run.q("block").replaceChildren(...cells);
    if (forced.some(Boolean)) run.q("block-legend").hidden = false;
    run.q("block").setAttribute("aria-label", `block being ${run.edit ? "edited" : "denoised"}: ${filled} of ${run.block.length} slots filled`);
    if (run.edit && run.filling) showFilling(run, Math.min(givenFrom, openAt < 0 ? ids.length : openAt));
    updateFigures(run);
  }

  // How many of a block's last slots spell the suffix (0 when they do not, or not yet).
  function suffixSlots(pieces, suffix) {
    let rest = suffix;
    let n = 0;
    while (rest && n < pieces.length) {
      const piece = pieces[pieces.length - 1 - n];
      if (!piece || !rest.endsWith(piece)) return 0;
      rest = rest.slice(0, -piece.length);
      n += 1;
    }
    return rest ? 0 : n;
  }

  // An edit's text while it runs: the slots before `end` as text, masked ones as hatched gaps.
  function showFilling(run, end) {
    const parts = run.block.slice(0, end).map((c) => {
      const el = document.createElement("span");
      if (c.id === null) {
        el.className = "gap";
        el.title = "masked";
      } else {
        el.textContent = c.piece || "";
        if (c.pass !== null) el.className = "c" + (c.pass % COLOURS);
      }
      return el;
    });
    run.middle.replaceChildren(...parts);
  }

  function onFinish(run, stats, reason) {
    if (run.filling) { // an empty middle: no text was committed
      run.middle.replaceChildren();
      run.filling = false;
    }
    run.final = stats;
    run.ended = performance.now();
    if (stats.forward_passes != null) {
      run.forwards = stats.forward_passes;
      run.exact = true;
    }
    setState(run, "done", reason === "length" ? "max tokens reached" : reason);
    updateFigures(run);
  }

  function updateFigures(run) {
    const f = run.final;
    const q = run.q;
    const seconds = ((run.ended || performance.now()) - run.started) / 1000;
    const approx = !f && !run.exact;
    q("forwards").textContent = (approx && run.forwards ? "≥ " : "") + run.forwards;
    q("tokens").textContent = String(f && f.generated_tokens != null ? f.generated_tokens : run.tokens);
    if (f) {
      q("tpf").textContent = f.tokens_per_forward != null ? f.tokens_per_forward.toFixed(2) : "…";
      const cycles = LOSSLESS.has(run.mode) && run.mode !== "ar";
      q("acceptance").textContent = cycles ? f.mean_acceptance.toFixed(2) : "n/a";
      q("acceptance").title = cycles ? "tokens per speculative cycle" : "this mode has no speculative cycles";
      q("tps").textContent = f.tokens_per_second != null ? f.tokens_per_second.toFixed(1) : "…";
      q("time").textContent = `${(f.seconds != null ? f.seconds : seconds).toFixed(2)} s`;
    } else {
      q("tpf").textContent = run.exact && run.forwards ? (run.tokens / run.forwards).toFixed(2) : "…";
      q("tps").textContent = seconds > 0 ? (run.tokens / seconds).toFixed(1) : "…";
      q("time").textContent = `${seconds.toFixed(2)} s`;
    }
  }

  // -- side by side -------------------------------------------------------------------------------------------
  function compare() {
    const box = $("comparison");
    if (runs.length !== 2 || runs.some((r) => r.state !== "done")) {
      box.hidden = true;
      return;
    }
    const [a, b] = runs;
    const lines = [];
    if (a.text === b.text) {
      lines.push(`Same text from ${a.mode} and ${b.mode}.`);
    } else {
      let i = 0;
      while (i < a.text.length && a.text[i] === b.text[i]) i++;
      const why = !LOSSLESS.has(a.mode) || !LOSSLESS.has(b.mode)
        ? "diffusion is not lossless"
        : a.sampled || b.sampled ? "sampled without a seed" : "unexpected for lossless modes";
      lines.push(`The texts differ from character ${i} (${why}).`);
    }
    const fa = a.final.forward_passes;
    const fb = b.final.forward_passes;
    if (fa && fb) {
      const [more, fewer] = fa >= fb ? [a, b] : [b, a];
      const ratio = Math.max(fa, fb) / Math.min(fa, fb);
      lines.push(`Forward passes: ${a.mode} ${fa}, ${b.mode} ${fb}` +
        (fa === fb ? "." : ` (${fewer.mode} needed ${ratio.toFixed(1)}× fewer than ${more.mode}).`));
    }
    lines.push(`Time: ${a.mode} ${a.final.seconds.toFixed(2)} s, ${b.mode} ${b.final.seconds.toFixed(2)} s (run at once, their passes share the engine).`);
    box.replaceChildren(...lines.map((t) => Object.assign(document.createElement("p"), { textContent: t })));
    box.hidden = false;
  }

  // -- running, stopping, errors ------------------------------------------------------------------------------
  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function stopAll() {
    for (const run of runs) if (run.state === "running") run.controller.abort();
  }

  async function start() {
    stopAll();
    clearError();
    if (!model) await loadModel();
    if (!model) return;
    const edit = editing();
    const modes = edit ? [edit] : [$("mode-a").value];
    if (!edit && $("compare").checked) modes.push($("mode-b").value);
    runs = modes.map(newRun);
    $("results").replaceChildren(...runs.map((r) => r.panel));
    $("results").dataset.count = String(runs.length);
    $("comparison").hidden = true;
    $("stop").disabled = false;
    // On a small screen the results start below the form: bring them into view.
    if ($("results").getBoundingClientRect().top > window.innerHeight * 0.6) $("results").scrollIntoView({ block: "start" });
    const timer = setInterval(() => runs.forEach((r) => r.state === "running" && updateFigures(r)), 100);
    const mine = runs;
    const errors = new Set();
    await Promise.all(mine.map(async (run) => {
      try {
        await execute(run);
      } catch (e) {
        if (e.name === "AbortError") {
          setState(run, "stopped");
        } else {
          run.controller.abort(); // close the stream, if one was open: the server frees the work
          setState(run, "error");
          errors.add(`${run.mode}: ${e.message}`);
        }
        run.ended = performance.now();
        updateFigures(run);
      }
    }));
    clearInterval(timer);
    if (runs !== mine) return; // a newer run took over the page
    if (errors.size) showError([...errors].join("\n"));
    $("stop").disabled = true;
    compare();
  }

  // -- editing controls ---------------------------------------------------------------------------------------
  function editing() {
    return $("infill").checked ? "infill" : $("revise").checked ? "revise" : null;
  }

  // Infill and revise exclude each other. Infill needs a completion prompt: switching it on sets the kind to
  // completion, switching it off sets back the kind it replaced.
  function toggleEdit(box) {
    const other = box.id === "infill" ? $("revise") : $("infill");
    if (box.checked) other.checked = false;
    if ($("infill").checked && kindBeforeInfill === null) {
      kindBeforeInfill = chosenKind();
      kindRadio("completion").checked = true;
    } else if (!$("infill").checked && kindBeforeInfill !== null) {
      kindRadio(kindBeforeInfill).checked = true;
      kindBeforeInfill = null;
    }
    syncControls();
  }

  // What an edit rules out (the mode, side by side; for infill, chat) and the fields it adds.
  function syncControls() {
    const edit = editing();
    kindRadio("chat").disabled = (model !== null && !model.has_chat_template) || edit === "infill";
    $("mode-a").disabled = edit !== null;
    $("compare").disabled = edit !== null;
    $("mode-b").disabled = edit !== null || !$("compare").checked;
    $("mode-hint").hidden = edit === null;
    $("suffix-field").hidden = edit !== "infill";
    $("draft-field").hidden = edit !== "revise";
    $("edit-hint").textContent = EDIT_HINTS[edit || "none"];
  }

  // -- wiring -------------------------------------------------------------------------------------------------
  function init() {
    fillModes($("mode-a"), MODES, "ar");
    fillModes($("mode-b"), MODES, "linear_spec");
    $("api-key").value = sessionStorage.getItem("trimode-api-key") || "";
    $("api-key").addEventListener("change", () => {
      sessionStorage.setItem("trimode-api-key", $("api-key").value.trim());
      loadModel();
    });
    $("run-form").addEventListener("submit", (e) => {
      e.preventDefault();
      start();
    });
    $("stop").addEventListener("click", stopAll);
    $("compare").addEventListener("change", syncControls);
    for (const box of [$("infill"), $("revise")]) box.addEventListener("change", () => toggleEdit(box));
    syncControls();
    $("rule").addEventListener("change", () => {
      const steps = $("rule").value === "steps";
      $("steps-label").hidden = !steps;
      $("threshold-label").hidden = steps;
    });
    for (const button of document.querySelectorAll("button.example")) {
      button.addEventListener("click", () => {
        $("prompt").value = button.dataset.prompt || button.textContent;
        $("prompt").focus();
      });
    }
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        start();
      } else if (e.key === "Escape") {
        stopAll();
      }
    });
    // Closing or leaving the tab cancels the requests; the server frees their work on disconnect.
    window.addEventListener("pagehide", stopAll);
    loadModel();
  }

  init();
})();
