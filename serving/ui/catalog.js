// The catalog's script: loads each page's content (sending the token when the server
// wants one), filters the groups list, and runs the lookup box against the API.
"use strict";

const TOKEN_KEY = "featureplane-token";
const main = () => document.getElementById("page");

function headers() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function partOf(path) {
  const rest = path.replace(/^\/ui\/?/, "");
  return "/ui/part/" + (rest === "" ? "groups" : rest);
}

async function load(path, push) {
  const resp = await fetch(partOf(path), { headers: headers() });
  if (resp.status === 401) {
    const refused = sessionStorage.getItem(TOKEN_KEY) !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    askToken(refused ? "That token was refused." : "");
    return;
  }
  document.getElementById("token").hidden = true;
  main().hidden = false;
  main().innerHTML = await resp.text();
  if (push) history.pushState({}, "", path);
  ready();
}

function askToken(message) {
  const form = document.getElementById("token");
  main().hidden = true;
  form.hidden = false;
  document.getElementById("token-error").textContent = message;
  document.getElementById("token-input").focus();
}

function ready() {
  const nav = location.pathname.replace(/^\/ui\/?/, "").split("/")[0] || "groups";
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("here", a.dataset.nav === nav);
  }
  filters();
  lookup();
}

// ------------------------------------------------------------------ groups list

function filters() {
  const search = document.getElementById("search");
  const table = document.getElementById("groups");
  if (!search || !table) return;
  const selects = [...document.querySelectorAll("select[data-facet]")];
  const apply = () => {
    const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    for (const row of table.tBodies[0].rows) {
      const text = row.dataset.text;
      const ok =
        words.every((w) => text.includes(w)) &&
        selects.every((s) => !s.value || (row.dataset[s.dataset.facet] || "").split(" ").includes(s.value));
      row.hidden = !ok;
      if (ok) shown += 1;
    }
    document.getElementById("shown").textContent = shown;
    document.getElementById("none").hidden = shown > 0;
  };
  search.addEventListener("input", apply);
  for (const s of selects) s.addEventListener("change", apply);
  apply();
}

// ------------------------------------------------------------------ lookup box

function lookup() {
  const form = document.getElementById("lookup");
  if (!form) return;
  const group = form.closest("[data-group]").dataset.group;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const params = new URLSearchParams();
    for (const name of ["limit", "since", "until"]) {
      const value = (data.get(name) || "").trim();
      if (value) params.set(name, value);
    }
    const id = data.get("id");
    const url = "/v1/features/" + encodeURIComponent(group) + "/" + encodeURIComponent(id) +
      (params.toString() ? "?" + params : "");
    const status = document.getElementById("lookup-status");
    const answer = document.getElementById("lookup-answer");
    status.textContent = "Asking…";
    answer.textContent = "";
    const started = performance.now();
    let resp, body;
    try {
      resp = await fetch(url, { headers: headers() });
      body = await resp.json();
    } catch (err) {
      status.textContent = "No answer: " + err;
      return;
    }
    const ms = (performance.now() - started).toFixed(1);
    if (resp.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      askToken("That token was refused.");
      return;
    }
    if (!resp.ok) {
      const error = body.error || {};
      status.textContent = `HTTP ${resp.status} in ${ms} ms: ${error.code || ""}: ${error.message || ""}`;
      return;
    }
    const items = body.items ? `${body.items.length} item${body.items.length === 1 ? "" : "s"}, newest first` : "found";
    status.textContent = body.found ? `Found in ${ms} ms: ${items}.` : `Not found (${ms} ms): nothing stored for this id.`;
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(body, null, 2);
    answer.appendChild(pre);
  });
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value);
    load(location.pathname, false);
  });
  document.addEventListener("click", (event) => {
    const a = event.target.closest("a");
    if (!a || a.origin !== location.origin || !a.pathname.startsWith("/ui")) return;
    if (a.pathname.startsWith("/ui/static") || event.metaKey || event.ctrlKey) return;
    if (a.pathname === location.pathname && a.hash) return;  // an anchor on this page
    event.preventDefault();
    load(a.pathname, true).then(() => {
      if (a.hash) document.getElementById(a.hash.slice(1))?.scrollIntoView();
    });
  });
  window.addEventListener("popstate", () => load(location.pathname, false));
  if (document.getElementById("loading")) load(location.pathname, false);
  else ready();
});
