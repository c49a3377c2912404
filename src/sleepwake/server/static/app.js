// The sleepwake page: chat with streamed replies, the memory and its sleep pressure.
// Plain JS against the server's own API; user text is only ever set as textContent.
"use strict";

const $ = (selector) => document.querySelector(selector);
const TOKEN_KEY = "sleepwake-token";
const USER_KEY = "sleepwake-user";
const POLL_MS = 2000;
const state = { history: [], conversation: null, busy: false, factsShown: "" };

function authHeaders(json) {
  const headers = json ? { "Content-Type": "application/json" } : {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

function notice(text, kind = "") {
  const el = $("#notice");
  el.textContent = text;
  el.className = kind;
}

// An Error carrying the server's own message ({"error": {"message": ...}}).
async function apiError(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const data = await res.json();
    if (data.error && data.error.message) message = data.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  if (res.status === 401) {
    message = `${message} (paste the server's token above)`;
    $("#token").focus();
  }
  const err = new Error(message);
  err.status = res.status;
  return err;
}

// The user whose memory this tab shows ("" for the default user, or the API key's).
function currentUser() {
  return sessionStorage.getItem(USER_KEY) || "";
}

async function api(method, path, body) {
  const user = currentUser();
  if (user && path.startsWith("/v1/memory/")) path += `?user=${encodeURIComponent(user)}`;
  const res = await fetch(path, {
    method,
    headers: authHeaders(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw await apiError(res);
  return res.json();
}

// --- chat ---------------------------------------------------------------------------

function bubble(role, text) {
  const li = document.createElement("li");
  li.className = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  $("#chat").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function noteFacts(li, facts, prefix) {
  for (const f of facts) {
    const note = document.createElement("div");
    note.className = "learned";
    note.textContent = `${prefix}: ${f.subject} · ${f.relation} · ${f.object}`;
    li.append(note);
  }
}

// Server-sent events from a fetch response: calls onData with each parsed `data:` JSON.
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const input = $("#message");
  const text = input.value.trim();
  if (!text || state.busy) return;
  state.busy = true;
  $("#send").disabled = true;
  input.value = "";
  const asked = bubble("user", text);
  const reply = bubble("assistant streaming", "");
  const replyText = reply.querySelector(".text");
  const messages = [...state.history, { role: "user", content: text }];
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders(true),
      body: JSON.stringify({ messages, stream: true, conversation: state.conversation ?? undefined,
                             user: currentUser() || undefined }),
    });
    if (!res.ok) throw await apiError(res);
    await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.sleepwake) {
        state.conversation = chunk.sleepwake.conversation;
        noteFacts(asked, chunk.sleepwake.learned, "learned");
        noteFacts(asked, chunk.sleepwake.pending, "will learn after the sleep");
        if (chunk.sleepwake.learned.length) refreshFacts();
      }
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        replyText.textContent += delta.content;
        reply.scrollIntoView({ block: "end" });
      }
    });
    state.history = [...messages, { role: "assistant", content: replyText.textContent }];
    notice("");
  } catch (err) {
    reply.remove();
    asked.classList.add("failed");
    notice(err.message, "error");
  } finally {
    reply.classList.remove("streaming");
    state.busy = false;
    $("#send").disabled = false;
    input.focus();
  }
}

// --- memory -------------------------------------------------------------------------

function factRow(f) {
  const tr = document.createElement("tr");
  const cells = [`${f.id}`, `${f.subject} · ${f.relation} · ${f.object}`, f.where];
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.append(td);
  }
  tr.children[2].className = `where ${f.where}`;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "forget";
  button.textContent = "Forget";
  button.title = `remove fact #${f.id} from the weights`;
  button.addEventListener("click", () => forget(f.id));
  const td = document.createElement("td");
  td.append(button);
  tr.append(td);
  return tr;
}

async function refreshFacts() {
  const facts = await api("GET", "/v1/memory/facts");
  const shown = JSON.stringify(facts);
  if (shown === state.factsShown) return;
  state.factsShown = shown;
  $("#facts").replaceChildren(...facts.map(factRow));
  $("#fact-count").textContent = `(${facts.length})`;
}

async function forget(id) {
  try {
    const f = await api("DELETE", `/v1/memory/facts/${id}`);
    notice(`forgot #${f.id}: ${f.subject} · ${f.relation} · ${f.object}`);
    await refreshFacts();
  } catch (err) {
    notice(err.message, "error");
  }
}

async function startSleep(path, body) {
  try {
    const started = await api("POST", path, body);
    notice(started.started === "nap" ? "nap started" : "deep sleep started");
    await refreshStatus();
  } catch (err) {
    notice(err.message, "error");
  }
}

function showStatus(st) {
  const p = st.pressure;
  $("#pressure").value = Math.min(p.total, 1);
  $("#pressure-value").textContent = p.total.toFixed(3);
  $("#pressure-parts").textContent =
    `edits ${p.edits.toFixed(3)} + time ${p.time.toFixed(3)} + perplexity ${p.perplexity.toFixed(3)}` +
    ` · due: ${p.due || "nothing"} · ${st.facts.memit} in MEMIT, ${st.facts.consolidated} consolidated`;
  let line;
  if (st.sleeping) {
    const since = Math.round(Date.now() / 1000 - st.sleeping.since);
    line = `${st.sleeping.kind === "nap" ? "napping" : "in deep sleep"} for ${since} s — replies come from the weights before it`;
  } else if (st.last_error) {
    line = `awake · the last sleep failed: ${st.last_error}`;
  } else if (st.last_cycle) {
    const c = st.last_cycle;
    line = `awake · last ${c.kind}: ${c.status}${c.reason ? ` (${c.reason})` : ""}`;
  } else {
    line = "awake";
  }
  $("#sleep-state").textContent = line;
  $("#sleep-state").className = st.sleeping ? "sleeping" : "";
  $("#nap").disabled = $("#deep-sleep").disabled = Boolean(st.sleeping);
}

async function refreshStatus() {
  showStatus(await api("GET", "/v1/memory/status"));
}

async function poll() {
  try {
    await Promise.all([refreshStatus(), refreshFacts()]);
  } catch (err) {
    notice(err.message, "error");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function showModel() {
  try {
    const models = await api("GET", "/v1/models");
    $("#model").textContent = models.data.map((m) => m.id).join(", ");
  } catch (_) { /* shown by the poll */ }
}

function useToken(event) {
  event.preventDefault();
  const value = $("#token").value.trim();
  const user = $("#user").value.trim();
  if (value || user === currentUser()) {  // an empty token field drops the token, unless the user changes
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("#token").value = "";
    $("#token").placeholder = value ? "token in use (this tab only)" : "paste the server's token";
  }
  if (user !== currentUser()) {  // another user's memory: a new conversation
    if (user) sessionStorage.setItem(USER_KEY, user);
    else sessionStorage.removeItem(USER_KEY);
    state.history = [];
    state.conversation = null;
    $("#chat").replaceChildren();
  }
  notice("");
  state.factsShown = "";
  showModel();
  refreshStatus().then(refreshFacts).catch((err) => notice(err.message, "error"));
}

function start() {
  $("#chat-form").addEventListener("submit", send);
  $("#message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("#chat-form").requestSubmit();
    }
  });
  $("#token-form").addEventListener("submit", useToken);
  $("#nap").addEventListener("click", () => startSleep("/v1/memory/nap"));
  $("#deep-sleep").addEventListener("click", () => startSleep("/v1/memory/sleep", { deep: true }));
  if (sessionStorage.getItem(TOKEN_KEY)) $("#token").placeholder = "token in use (this tab only)";
  $("#user").value = currentUser();
  showModel();
  poll();
}

start();
