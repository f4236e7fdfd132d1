// mes-hub's floor screens: the small script every page shares (no third-party code).
// - send(): requests to the hub with the session's CSRF token;
// - live(): the pages' server-sent events, with the link state shown in the header;
// - TapQueue: an operator's taps, each a CloudEvent with its id made here, kept on the
//   device while the hub cannot be reached and sent when it can (the id makes a resend
//   harmless: the hub answers a repeat as a duplicate);
// - CSV export of any table marked data-csv; times in state counted up every second.

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content ?? "";

export function csrfHeaders() {
  return { [meta("csrf-header") || "X-CSRF-Token"]: meta("csrf-token") };
}

// A request the shop-floor Wi-Fi swallows (no answer, no error) is given up after this: the
// tap stays queued and goes again.
const SEND_TIMEOUT_MS = 10_000;

export async function send(url, { method = "POST", body, type = "application/json" } = {}) {
  const headers = { ...csrfHeaders(), Accept: "application/json, application/problem+json" };
  if (body !== undefined) headers["Content-Type"] = type;
  return fetch(url, {
    method, headers, credentials: "same-origin", signal: AbortSignal.timeout(SEND_TIMEOUT_MS),
    body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
  });
}

// The session has ended (signed out elsewhere, ended by an admin, its key revoked): say so,
// with the way back, instead of failing quietly.
export function signedOut() {
  const el = document.getElementById("link-state");
  if (!el || el.querySelector("a")) return;
  const back = encodeURIComponent(location.pathname + location.search);
  el.textContent = "Signed out: ";
  const a = document.createElement("a");
  a.href = `/ui/login?next=${back}`;
  a.textContent = "sign in again";
  el.append(a);
}

// A version 4 UUID from the browser's random numbers (crypto.randomUUID exists only on https
// and localhost; a tablet on the plant's network often has neither).
export function newId() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function setLinkState(text) {
  const el = document.getElementById("link-state");
  if (el) el.textContent = text;
}

// The page's live stream: handlers.tiles({tiles, full, position}), handlers.views({machines,
// position, full}). machines: the machine ids the page shows (none: all). A page without a
// tiles handler gets the views' moves only (the first one full: the stream is open).
export function live(machines, handlers) {
  const params = (machines ?? []).map((m) => `machine=${encodeURIComponent(m)}`);
  if (!handlers.tiles) params.push("tiles=false");
  const query = params.join("&");
  let source;
  const open = () => {
    source = new EventSource(`/ui/live${query ? `?${query}` : ""}`);
    for (const [name, handle] of Object.entries(handlers)) {
      source.addEventListener(name, (e) => handle(JSON.parse(e.data)));
    }
    source.onopen = () => document.body.classList.remove("disconnected");
    source.onerror = async () => {
      document.body.classList.add("disconnected");
      if (source.readyState !== EventSource.CLOSED) return; // it reconnects by itself
      // Refused (not merely cut): while the session is over, stop and say so.
      try {
        const me = await fetch("/api/v1/me", { credentials: "same-origin" });
        if (me.status === 401) return signedOut();
      } catch {
        // the hub cannot be reached: try again
      }
      setTimeout(open, 2000);
    };
  };
  open();
  return () => source.close();
}

const problemOf = async (response) => {
  try {
    return await response.json();
  } catch {
    return { detail: `the hub answered ${response.status}` };
  }
};

// Taps kept in localStorage under `key` until the hub has them. onChange(waiting) after each
// change; onRefused(tap, message) when the hub refuses one for what it says (it is then
// dropped: sending it again would be refused again); onAccepted(tap, receipt); onSignedOut()
// when the session is over (the taps are kept for after signing in again). now(): the time
// taps are dated with, in ms (the station gives the hub's clock: a tablet's may be off).
export class TapQueue {
  constructor(
    key,
    { onChange = () => {}, onRefused = () => {}, onAccepted = () => {}, onSignedOut = signedOut,
      now = () => Date.now() } = {},
  ) {
    this.key = key;
    this.onChange = onChange;
    this.onRefused = onRefused;
    this.onAccepted = onAccepted;
    this.onSignedOut = onSignedOut;
    this.now = now;
    this.sending = false;
    window.addEventListener("online", () => this.flush());
    setInterval(() => this.flush(), 5000);
  }

  get waiting() {
    try {
      return JSON.parse(localStorage.getItem(this.key) || "[]");
    } catch {
      return [];
    }
  }

  _save(taps) {
    localStorage.setItem(this.key, JSON.stringify(taps));
    this.onChange(taps);
  }

  // A CloudEvent of `type` about `subject` (a machine), dated now, with its id made here.
  event(type, subject, data) {
    return {
      specversion: "1.0", id: newId(), source: `mes-hub/ui/station/${subject}`, type, subject,
      time: new Date(this.now()).toISOString(), datacontenttype: "application/json", data,
    };
  }

  add(tap) {
    this._save([...this.waiting, tap]);
    return this.flush();
  }

  async flush() {
    if (this.sending) return;
    this.sending = true;
    try {
      for (;;) {
        const [tap] = this.waiting;
        if (!tap) break;
        let response;
        try {
          response = await send("/api/v1/events", {
            body: tap, type: "application/cloudevents+json",
          });
        } catch {
          break; // the hub cannot be reached: kept, sent when it can be
        }
        if (response.status >= 500 || response.status === 429) {
          break; // the hub is busy or starting: kept
        }
        const problem = response.ok ? null : await problemOf(response);
        if (response.status === 401 || problem?.csrf_required) {
          // The session is over, or this page's token is stale (signed in again elsewhere):
          // kept for after signing in again.
          this.onSignedOut();
          break;
        }
        this._save(this.waiting.filter((t) => t.id !== tap.id));
        if (response.ok) this.onAccepted(tap, await response.json());
        else this.onRefused(tap, problem.detail || problem.title || `${response.status}`);
      }
    } finally {
      this.sending = false;
      this.onChange(this.waiting);
    }
  }
}

// "12 min", "3 h 05 min" since an ISO time.
export function since(iso, now = Date.now()) {
  if (!iso) return "";
  const s = Math.max(0, Math.floor((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

function tickSince() {
  for (const el of document.querySelectorAll("[data-since]")) {
    el.textContent = since(el.dataset.since);
  }
}

function csvOf(table) {
  const cell = (c) => {
    let text = (c.dataset.value ?? c.textContent).trim().replace(/\s+/g, " ");
    // A cell a spreadsheet would run as a formula (an ERP's customer name, a reason code
    // from NATS) is kept as text; numbers, negative ones included, stay numbers.
    if (/^[=+\-@\t\r]/.test(text) && !/^[-+]?\d[\d.,]*(e[-+]?\d+)?$/i.test(text)) {
      text = `'${text}`;
    }
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  };
  return [...table.rows]
    .filter((r) => !r.closest("tfoot") || r.cells.length)
    .map((r) => [...r.cells].filter((c) => !c.classList.contains("no-csv")).map(cell).join(","))
    .join("\r\n");
}

export function addCsvButtons(root = document) {
  for (const table of root.querySelectorAll("table[data-csv]")) {
    if (table.previousElementSibling?.classList.contains("csv-export")) continue;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "csv-export";
    button.textContent = `Export ${table.dataset.csv} as CSV`;
    button.addEventListener("click", () => {
      const blob = new Blob([csvOf(table) + "\r\n"], { type: "text/csv" });
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `${table.dataset.csv}.csv`;
      a.click();
      URL.revokeObjectURL(a.href);
    });
    table.before(button);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  addCsvButtons();
  tickSince();
  setInterval(tickSince, 1000);
});
