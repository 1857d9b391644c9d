// The chat page of `localmix serve`: conversations kept in this browser (localStorage), replies
// streamed from the same server's /v1/chat/completions (fetch reading the server-sent events),
// the model, its context and the server's slots from /props. The API key, when the server needs
// one, is sent as the Bearer header and kept in this tab only (sessionStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "localmix.conversations", CURRENT = "localmix.current", SETTINGS = "localmix.settings";
const KEY = "localmix.apiKey";
const FIELDS = ["temperature", "top_p", "max_tokens", "seed"];

const app = {
  props: null,          // the server's /props
  conversations: [],    // [{id, title, created, system, messages: [{role, content, stats, error, stopped}]}]
  current: null,        // the id shown
  controller: null,     // the running reply's AbortController
  gone: false,          // the server did not answer
};

// ---- storage -------------------------------------------------------------------------------

function loadAll() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "[]");
    app.conversations = Array.isArray(saved) ? saved.filter(valid) : [];
  } catch (e) {
    app.conversations = [];
  }
  app.current = localStorage.getItem(CURRENT);
  let settings = {};
  try {
    settings = JSON.parse(localStorage.getItem(SETTINGS) || "{}") || {};
  } catch (e) { /* the defaults */ }
  for (const f of FIELDS) $(f).value = settings[f] ?? "";
}

function saveAll() {
  try {
    localStorage.setItem(STORE, JSON.stringify(app.conversations));
    if (app.current) localStorage.setItem(CURRENT, app.current);
  } catch (e) {
    notice("This browser's storage is full: the conversation was not saved. Export and delete old ones.");
  }
}

function valid(c) {
  return c && typeof c === "object" && Array.isArray(c.messages) && c.messages.every(
    (m) => m && ["user", "assistant"].includes(m.role) && typeof m.content === "string");
}

const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

function conversation() {
  let c = app.conversations.find((x) => x.id === app.current);
  if (!c) {
    c = { id: newId(), title: "New chat", created: Date.now(), system: "", messages: [] };
    app.conversations.unshift(c);
    app.current = c.id;
  }
  return c;
}

// ---- the server ----------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    const e = body.error;
    return (e && (e.message || e)) || JSON.stringify(body);
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function serverGone() {
  app.gone = true;
  notice(`The server at ${location.origin} does not answer: is \`localmix serve\` still running? ` +
    "This page tries again every few seconds.", "error");
  setTimeout(loadProps, 3000);
}

async function loadProps() {
  let response;
  try {
    response = await fetch("/props", { headers: headers(), cache: "no-store" });
  } catch (e) {
    return serverGone();
  }
  if (response.status === 401) return askKey(await errorText(response));
  if (!response.ok) {
    notice(`The server answered ${response.status}: ${await errorText(response)}`, "error");
    return setTimeout(loadProps, 3000);
  }
  app.props = await response.json();
  if (app.gone || $("notice").dataset.kind === "error") clearNotice();
  app.gone = false;
  $("key-form").hidden = true;
  showProps();
  if (app.props.status === "error") {
    notice(`The server could not load the model: ${app.props.error}`, "error");
  } else if (app.props.status !== "ok") {
    notice("The model is loading…");
    setTimeout(loadProps, 1000);
  } else if ($("notice").textContent === "The model is loading…") {
    clearNotice();
  }
}

function showProps() {
  const p = app.props;
  $("model-name").textContent = p.model;
  document.title = `${p.model} · localmix`;
  const parts = [];
  if (p.n_ctx) parts.push(`context ${p.n_ctx.toLocaleString("en")} tokens`);
  if (p.total_slots) parts.push(`${p.total_slots} slot${p.total_slots === 1 ? "" : "s"} (--parallel)`);
  $("model-props").textContent = parts.join(" · ");
  const d = p.default_generation_settings || {};
  for (const f of FIELDS) $(f).placeholder = d[f] === null || d[f] === undefined ? "random" : String(d[f]);
}

function askKey(message) {
  $("key-form").hidden = false;
  notice(sessionStorage.getItem(KEY) ? `The API key was refused (${message}); enter it again.`
    : "This server needs an API key (it was started with --api-key).", "error");
  $("key").focus();
}

// ---- notices -------------------------------------------------------------------------------

function notice(text, kind = "info") {
  const n = $("notice");
  n.textContent = text;
  n.dataset.kind = kind;
  n.hidden = false;
}

function clearNotice() {
  $("notice").hidden = true;
  $("notice").textContent = "";
  delete $("notice").dataset.kind;
}

// ---- replies -------------------------------------------------------------------------------

function requestBody(c) {
  const messages = [];
  if (c.system.trim()) messages.push({ role: "system", content: c.system });
  for (const m of c.messages.slice(0, -1)) {
    if (!m.content && m.role !== "user") continue;  // a reply that failed before its first word
    const last = messages[messages.length - 1];
    if (last && last.role === "user" && m.role === "user") last.content += "\n\n" + m.content;  // roles alternate
    else messages.push({ role: m.role, content: m.content });
  }
  const body = { model: app.props.model, messages, stream: true, stream_options: { include_usage: true } };
  for (const f of FIELDS) {
    const v = $(f).value.trim();
    if (v !== "") body[f] = f === "max_tokens" || f === "seed" ? parseInt(v, 10) : parseFloat(v);
  }
  return body;
}

/** Read the server-sent events of `response`, calling `onEvent(object)` for each `data:`. */
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

async function generate(c) {
  if (!app.props) {
    notice("Not connected to the server yet.", "error");
    return;
  }
  const reply = { role: "assistant", content: "", stats: null };
  c.messages.push(reply);
  c.updated = Date.now();
  saveAll();  // the question is kept even if the page is closed mid-reply
  showConversation();
  const element = $("messages").lastElementChild;
  const content = element.querySelector(".content");
  const controller = new AbortController();
  app.controller = controller;
  setStreaming(true);
  const t0 = performance.now();
  let tFirst = null, pieces = 0, usage = null, finish = null, drawn = false, saved = t0;
  const draw = () => {
    drawn = false;
    Render.into(content, reply.content);
    content.classList.toggle("empty", !reply.content);
    scrollDown();
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(c)), signal: controller.signal,
    });
    if (!response.ok) {
      const text = await errorText(response);
      if (response.status === 401) askKey(text);
      reply.error = response.status === 400 && /context/.test(text) ? `The conversation does not fit: ${text}` : text;
    } else {
      await readEvents(response, (event) => {
        if (event.error) throw new Error(event.error.message || String(event.error));
        if (event.usage) usage = event.usage;
        const choice = event.choices && event.choices[0];
        if (!choice) return;
        if (choice.finish_reason) finish = choice.finish_reason;
        const text = choice.delta && choice.delta.content;
        if (!text) return;
        if (tFirst === null) tFirst = performance.now();
        pieces += 1;
        reply.content += text;
        if (!drawn) {
          drawn = true;
          requestAnimationFrame(draw);
        }
        if (performance.now() - saved > 2000) {  // the reply so far, in case the tab is closed
          saved = performance.now();
          saveAll();
        }
      });
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else if (e instanceof TypeError) {
      reply.error = "The server is gone: the reply was cut off.";
      serverGone();
    } else reply.error = e.message;
  } finally {
    const tEnd = performance.now();
    const tokens = usage ? usage.completion_tokens : pieces;
    reply.stats = {
      prompt: usage ? usage.prompt_tokens : null, tokens, estimated: !usage,
      ttft: tFirst === null ? null : (tFirst - t0) / 1000,
      tps: tFirst !== null && tokens > 1 && tEnd > tFirst ? (tokens - 1) / ((tEnd - tFirst) / 1000) : null,
      finish,
    };
    if (app.controller === controller) app.controller = null;
    setStreaming(false);
    saveAll();
    showConversation();
  }
}

function stop() {
  if (app.controller) app.controller.abort();
}

function setStreaming(on) {
  document.body.dataset.state = on ? "streaming" : "idle";
  $("messages").setAttribute("aria-busy", String(on));
  $("stop").hidden = !on;
  $("send").hidden = on;
  for (const b of document.querySelectorAll(".actions button")) b.disabled = on;
  const focus = document.activeElement;
  if (!on && (!focus || focus === document.body || focus === $("stop"))) $("input").focus();
}

function statsLine(s) {
  if (!s) return "";
  const parts = [];
  if (s.prompt !== null) parts.push(`${s.prompt} prompt tokens`);
  parts.push(`${s.estimated ? "~" : ""}${s.tokens} reply tokens`);
  if (s.tps !== null) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.ttft !== null) parts.push(`first token ${s.ttft.toFixed(2)} s`);
  if (s.finish === "length") parts.push("cut at max tokens or the context's end");
  return parts.join(" · ");
}

// ---- drawing -------------------------------------------------------------------------------

function scrollDown() {
  const m = $("messages");
  m.scrollTop = m.scrollHeight;
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function showConversation() {
  const c = conversation();
  $("system").value = c.system;
  const list = $("messages");
  list.replaceChildren();
  if (!c.messages.length) {
    const empty = document.createElement("p");
    empty.className = "welcome";
    empty.textContent = "Ask anything. Replies stream from the model this server runs, on this machine.";
    list.append(empty);
  }
  const streaming = !!app.controller;
  c.messages.forEach((m, i) => {
    const element = document.createElement("article");
    element.className = `msg ${m.role}`;
    element.dataset.role = m.role;
    const content = document.createElement("div");
    content.className = "content";
    if (m.role === "user") content.textContent = m.content;
    else Render.into(content, m.content);
    if (!m.content) content.classList.add("empty");
    element.append(content);
    if (m.error || m.stopped) {
      const note = document.createElement("div");
      note.className = m.error ? "error" : "stopped";
      note.textContent = m.error || "Stopped.";
      element.append(note);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = statsLine(m.stats);
    const actions = document.createElement("span");
    actions.className = "actions";
    if (m.role === "user") actions.append(button("Edit", "Edit this message and send it again", () => edit(i)));
    if (m.role === "assistant" && m.content && navigator.clipboard) {  // a secure context: loopback or https
      actions.append(button("Copy", "Copy the reply's Markdown", () => navigator.clipboard.writeText(m.content)));
    }
    if (m.role === "assistant" && i === c.messages.length - 1) {
      actions.append(button("Regenerate", "Replace this reply with a new one", regenerate));
    }
    for (const b of actions.children) b.disabled = streaming;
    meta.append(stats, actions);
    element.append(meta);
    list.append(element);
  });
  showList();
  scrollDown();
}

function showList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of app.conversations) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (c.id === app.current) li.className = "current";
    const title = button(c.title || "Untitled", "Open", () => open(c.id));
    title.className = "title";
    const rename = button("✎", "Rename", () => renameInPlace(li, c));
    rename.setAttribute("aria-label", `Rename ${c.title}`);
    const remove = button("×", "Delete", () => removeConversation(c));
    remove.setAttribute("aria-label", `Delete ${c.title}`);
    li.append(title, rename, remove);
    ul.append(li);
  }
}

// ---- actions -------------------------------------------------------------------------------

function send() {
  const text = $("input").value;
  if (app.controller || !text.trim()) return;
  const c = conversation();
  if (!c.messages.length && (!c.title || c.title === "New chat")) c.title = text.trim().slice(0, 48);
  c.messages.push({ role: "user", content: text });
  $("input").value = "";
  generate(c);
}

function regenerate() {
  const c = conversation();
  if (app.controller || !c.messages.length || c.messages[c.messages.length - 1].role !== "assistant") return;
  c.messages.pop();
  generate(c);
}

function edit(i) {
  if (app.controller) return;
  const c = conversation();
  const element = $("messages").children[i];
  const box = document.createElement("textarea");
  box.className = "edit";
  box.value = c.messages[i].content;
  box.rows = Math.min(12, box.value.split("\n").length + 1);
  const done = () => {
    if (!box.value.trim()) return;
    c.messages = c.messages.slice(0, i);
    c.messages.push({ role: "user", content: box.value });
    generate(c);
  };
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      done();
    } else if (e.key === "Escape") {
      e.stopPropagation();
      showConversation();
    }
  });
  const bar = document.createElement("div");
  bar.className = "actions";
  bar.append(button("Send", "Send the edited message; the replies after it are dropped", done),
    button("Cancel", "Keep the message as it was", showConversation));
  element.replaceChildren(box, bar);
  box.focus();
}

function open(id) {
  if (app.controller) stop();
  app.current = id;
  saveAll();
  showConversation();
  document.body.classList.remove("sidebar-open");
}

function newChat() {
  if (app.controller) stop();
  const c = conversation();
  if (c.messages.length) app.current = null;
  conversation().system = c.system;  // the system prompt carries over to the new chat
  saveAll();
  showConversation();
  document.body.classList.remove("sidebar-open");
  $("input").focus();
}

function renameInPlace(li, c) {
  const input = document.createElement("input");
  input.className = "rename";
  input.value = c.title;
  input.setAttribute("aria-label", "New name");
  const finish = (keep) => {
    if (keep && input.value.trim()) c.title = input.value.trim();
    saveAll();
    showList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") {
      e.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  li.replaceChildren(input);
  input.select();
}

function removeConversation(c) {
  if (!confirm(`Delete "${c.title}"?`)) return;
  if (c.id === app.current && app.controller) stop();
  app.conversations = app.conversations.filter((x) => x.id !== c.id);
  if (c.id === app.current) app.current = app.conversations.length ? app.conversations[0].id : null;
  saveAll();
  showConversation();
}

function exportAll() {
  const data = { format: "localmix-conversations", version: 1, exported: new Date().toISOString(),
    conversations: app.conversations };
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `localmix-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function importText(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    return notice("That file is not JSON.", "error");
  }
  const list = Array.isArray(data) ? data : data && data.conversations;
  if (!Array.isArray(list) || !list.every(valid)) {
    return notice("That file holds no conversations exported from this page.", "error");
  }
  const known = new Set(app.conversations.map((c) => c.id));
  const added = list.map((c) => ({
    id: c.id && !known.has(c.id) ? String(c.id) : newId(), title: String(c.title || "Imported"),
    created: Number(c.created) || Date.now(), system: typeof c.system === "string" ? c.system : "",
    messages: c.messages.map((m) => ({ role: m.role, content: m.content, stats: m.stats || null,
      error: typeof m.error === "string" ? m.error : undefined, stopped: !!m.stopped })),
  }));
  app.conversations = [...added, ...app.conversations];
  if (added.length) app.current = added[0].id;
  saveAll();
  showConversation();
  notice(`Imported ${added.length} conversation${added.length === 1 ? "" : "s"}.`);
}

// ---- wiring --------------------------------------------------------------------------------

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && app.controller) {
      e.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("export").addEventListener("click", exportAll);
  $("import-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) file.text().then(importText);
    e.target.value = "";
  });
  $("settings-toggle").addEventListener("click", () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
  });
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  $("system").addEventListener("input", () => {
    conversation().system = $("system").value;
    saveAll();
  });
  for (const f of FIELDS) {
    $(f).addEventListener("input", () => {
      const settings = Object.fromEntries(FIELDS.map((x) => [x, $(x).value]));
      localStorage.setItem(SETTINGS, JSON.stringify(settings));
    });
  }
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    loadProps();
  });
  $("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
  $("close-sidebar").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
}

loadAll();
wire();
setStreaming(false);
showConversation();
loadProps();
$("input").focus();
