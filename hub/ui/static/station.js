// The operator station at one machine (hub/ui/station.py; no third-party code).
//
// What it keeps:  data  — GET /ui/station/{machine}/data (read_station: tile, the shift's
//                         stops, orders, reasons, prompt_after_s, now), first from the page's
//                         <script id="station-data">, then fetched again (one fetch at a time)
//                         when the live stream says the machine changed;
//                 tile  — the newest tile (the live stream's, or data's);
//                 the operator's name (localStorage, per device) and the taps waiting
//                 (TapQueue of mes.js, in localStorage until the hub has them).
// What it shows:  render() draws each region from those: the tile, the picker (the reason
//                 tree, level by level: the prompt for the stop going on, or a stop the
//                 operator chose, or the two parts of a split), the stops, the orders, scrap.
// What it sends:  every tap is a CloudEvent through the TapQueue to POST /api/v1/events; the
//                 hub's answer decides: accepted → data fetched again (the page shows what the
//                 hub's timeline says, not what was tapped); refused → its detail in the alert.

import { TapQueue, live, setLinkState, since } from "/ui/static/mes.js";

const root = document.getElementById("station");
const machine = root.dataset.machine;
const zone = root.dataset.timeZone || "UTC";

const OPERATOR_KEY = "mes-hub.station.operator";
const TAPS_KEY = "mes-hub.station.taps"; // one queue per device: any station page sends them
const SCRAP_REASONS_KEY = "mes-hub.station.scrap-reasons";
const REASON = "mes.operator.downtime_reason.v1";
const ORDER_STARTED = "mes.operator.order_started.v1";
const ORDER_ENDED = "mes.operator.order_ended.v1";
const SCRAP = "mes.operator.scrap.v1";
const PROMPT_STATES = ["stopped", "offline"];
const UNASSIGNED = "unassigned";
const ANSWER_GRACE_MS = 60_000; // a reason the hub took hides the prompt while its views catch up
const STATE_WORDS = {
  running: "Running", stopped: "Stopped", offline: "Offline", planned_stop: "Planned stop",
  no_shift: "No shift", not_commissioned: "Not commissioned",
};

const $ = (id) => document.getElementById(id);
const els = {
  tile: $("tile"), picker: $("picker"), stops: $("stops-body"), orders: $("orders-body"),
  alert: $("station-alert"), notice: $("station-notice"), waiting: $("taps-waiting"),
  operatorForm: $("operator-form"), operatorName: $("operator-name"),
  operatorShown: $("operator-shown"), operatorCurrent: $("operator-current"),
  operatorChange: $("operator-change"), scrapForm: $("scrap-form"), scrapOrder: $("scrap-order"),
  scrapQuantity: $("scrap-quantity"), scrapReason: $("scrap-reason"),
  scrapReasons: $("scrap-reasons"),
};

let data = JSON.parse($("station-data").textContent);
let tile = data.tile;
let skew = Date.parse(data.now) - Date.now(); // the hub's clock minus this tablet's
const hubNow = () => Date.now() + skew;

// --- small helpers -----------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const clock = new Intl.DateTimeFormat("en-GB", {
  timeZone: zone, hour: "2-digit", minute: "2-digit", hourCycle: "h23",
});
const hhmm = (iso) => (iso ? clock.format(new Date(iso)) : "");
const span = (start, end) => (end ? `${hhmm(start)}–${hhmm(end)}` : `since ${hhmm(start)}`);
const percent = (share) => (share === null || share === undefined ? "–" : `${Math.round(share * 100)} %`);
const stateWord = (state) => STATE_WORDS[state] ?? state.replace(/_/g, " ");
const reasonWord = (reason) => (reason === UNASSIGNED ? "no reason given yet" : reason ?? "");
const at = (iso) => Date.parse(iso);

// "45 s", "12 min", "2 h 05 min" from start to end (none: to now), as mes.js' since().
function length(start, end) {
  const s = Math.max(0, Math.floor(((end ? at(end) : hubNow()) - at(start)) / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

// Draw a region only when what it shows changed (keeps focus, and a 1 s timer cheap).
function draw(el, key, make) {
  if (el.dataset.drawn === key) return false;
  el.dataset.drawn = key;
  el.replaceChildren(...[make()].flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return true;
}

// A wall time "HH:MM" in the plant's time zone on a day around `near`, as epoch ms: each of
// the days from the one before to two after, in order.
const zoneParts = new Intl.DateTimeFormat("en-US", {
  timeZone: zone, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
  hour: "2-digit", minute: "2-digit", second: "2-digit",
});
function partsOf(ms) {
  const parts = {};
  for (const p of zoneParts.formatToParts(new Date(ms))) {
    if (p.type !== "literal") parts[p.type] = Number(p.value);
  }
  return parts;
}
function offsetAt(ms) {
  const p = partsOf(ms);
  return Date.UTC(p.year, p.month - 1, p.day, p.hour, p.minute, p.second) - Math.floor(ms / 1000) * 1000;
}
function wallTimes(near, hhmmText) {
  const [hour, minute] = hhmmText.split(":").map(Number);
  const day = partsOf(near);
  const found = [];
  for (const k of [-1, 0, 1, 2]) {
    const wall = Date.UTC(day.year, day.month - 1, day.day + k, hour, minute);
    let t = wall - offsetAt(wall);
    t = wall - offsetAt(t);
    found.push(t);
  }
  return found;
}

// --- the operator ------------------------------------------------------------------------------

let editingOperator = false;
let afterOperator = null; // the tap waiting for a name

const operator = () => (localStorage.getItem(OPERATOR_KEY) || "").trim();

function renderOperator() {
  const name = operator();
  const asking = !name || editingOperator;
  els.operatorForm.hidden = !asking;
  els.operatorShown.hidden = asking;
  els.operatorCurrent.textContent = name;
}

function withOperator(action) {
  if (operator()) return action();
  afterOperator = action;
  editingOperator = true;
  renderOperator();
  showAlert("Who is at the machine? Enter your name or badge number first, then Save.");
  els.operatorName.focus();
  return undefined;
}

els.operatorForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const name = els.operatorName.value.trim();
  if (!name) {
    showAlert("Enter your name or badge number.");
    els.operatorName.focus();
    return;
  }
  localStorage.setItem(OPERATOR_KEY, name.slice(0, 128));
  editingOperator = false;
  clearAlert();
  renderOperator();
  const pending = afterOperator;
  afterOperator = null;
  if (pending) pending();
});

els.operatorChange.addEventListener("click", () => {
  editingOperator = true;
  els.operatorName.value = operator();
  renderOperator();
  els.operatorName.focus();
});

// --- messages ----------------------------------------------------------------------------------

function showAlert(text, link) {
  const lines = [...els.alert.querySelectorAll("p")].map((p) => p.textContent).slice(-2);
  els.alert.replaceChildren(
    ...[...lines.filter((l) => l !== text), text].map((l) => h("p", {}, l)),
    link ? h("p", {}, h("a", { href: link.href }, link.text)) : null,
    h("button", { type: "button", class: "small", onclick: clearAlert }, "Dismiss"),
  );
}

function clearAlert() {
  els.alert.replaceChildren();
}

let noticeTimer;
function notice(text) {
  els.notice.textContent = text;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { els.notice.textContent = ""; }, 10_000);
}

function describe(tap) {
  const d = tap.data ?? {};
  const where = tap.subject === machine ? "" : ` on ${tap.subject}`;
  switch (tap.type) {
    case REASON:
      return `reason ${d.reason} for the stop ${span(d.start, d.end)}${where}`;
    case ORDER_STARTED:
      return `start of order ${d.order_id}${where}`;
    case ORDER_ENDED:
      return `end of order ${d.order_id}${where}`;
    case SCRAP:
      return `${d.quantity} scrapped (${d.reason})${d.order_id ? ` on order ${d.order_id}` : ""}${where}`;
    default:
      return tap.type;
  }
}

// --- taps --------------------------------------------------------------------------------------

const answered = new Map(); // start of a stop (ms) -> when the hub took an open reason for it

const queue = new TapQueue(TAPS_KEY, {
  // Taps are dated by the hub's clock (as last heard): a tablet's may be minutes off, and the
  // hub refuses events dated too far ahead of its own.
  now: hubNow,
  onChange: () => render(),
  onSignedOut: () => showAlert("This tablet is no longer signed in: taps wait until it is.", {
    href: `/ui/login?next=${encodeURIComponent(location.pathname)}`, text: "Sign in again",
  }),
  onAccepted: (tap, receipt) => {
    if (tap.type === REASON && !tap.data.end) answered.set(at(tap.data.start), Date.now());
    notice(`Recorded: ${describe(tap)}${receipt?.duplicate ? " (the hub had it already)" : ""}.`);
    refetchSoon();
  },
  onRefused: (tap, message) => {
    if (tap.type === REASON) answered.delete(at(tap.data.start));
    showAlert(`Not recorded: ${describe(tap)}. ${message}`);
    refetchSoon();
  },
});

function tap(type, body) {
  queue.add(queue.event(type, machine, body));
  render();
}

const waitingHere = () => queue.waiting.filter((t) => t.subject === machine);

// --- the picker: the reason tree ---------------------------------------------------------------

// The catalog's codes as a tree: {name, code, kind (a leaf's), children: Map}.
function reasonTree(reasons) {
  const top = { name: "", code: "", children: new Map() };
  for (const [code, kind] of Object.entries(reasons ?? {})) {
    let node = top;
    code.split("/").forEach((name, i, names) => {
      if (!node.children.has(name)) {
        node.children.set(name, { name, code: names.slice(0, i + 1).join("/"), children: new Map() });
      }
      node = node.children.get(name);
    });
    node.kind = kind;
  }
  return top;
}

const leafCount = (node) =>
  node.kind ? 1 : [...node.children.values()].reduce((n, c) => n + leafCount(c), 0);

let chosen = null; // the picker the operator opened: {kind: "stop"|"split-time"|"split", ...}
let path = []; // the tree level shown
let pathOf = ""; // which picker `path` belongs to
let shownPicker = "";

// Where the stop going on began (the part still without a reason): the tile's `since`, or the
// first of the unassigned pieces at the end of the ongoing stop if the data is as new as the
// tile (a stop that went on from stopped to offline, or began before the tile looks back).
function currentStopStart() {
  const candidates = tile.since ? [tile.since] : [];
  const sameTile = data.tile.state === tile.state && data.tile.reason === tile.reason
    && data.tile.since === tile.since;
  const ongoing = data.stops.find((s) => s.end === null);
  if (ongoing && sameTile) {
    let run = null;
    for (let i = ongoing.pieces.length - 1; i >= 0 && ongoing.pieces[i].reason === UNASSIGNED; i--) {
      run = ongoing.pieces[i].start;
    }
    if (run) candidates.push(run);
  }
  return candidates.reduce((a, b) => (a === null || at(b) < at(a) ? b : a), null);
}

function reasonWaiting(start) {
  return waitingHere().some((t) => t.type === REASON && !t.data.end && at(t.data.start) === at(start));
}

// The prompt: the machine stopped (or offline) longer than prompt_after_s with no reason, and
// not answered already (a tap waiting, or taken by the hub and its views not there yet).
function promptTarget() {
  if (!PROMPT_STATES.includes(tile.state) || tile.reason !== UNASSIGNED) return null;
  const start = currentStopStart();
  if (!start || hubNow() - at(start) < (data.prompt_after_s ?? 0) * 1000) return null;
  if (reasonWaiting(start)) return null;
  const taken = answered.get(at(start));
  if (taken !== undefined && Date.now() - taken < ANSWER_GRACE_MS) return null;
  return { kind: "prompt", start, end: null };
}

function openPicker(p) {
  chosen = p;
  renderPicker(true);
  els.picker.scrollIntoView({ block: "nearest" });
}

function closePicker() {
  chosen = null;
  renderPicker(true);
}

function pick(p, code) {
  if (p.kind === "split") {
    const codes = [...p.codes, code];
    if (codes.length < 2) {
      chosen = { ...p, codes };
      renderPicker(true);
      return;
    }
    withOperator(() => {
      const [first, second] = p.parts;
      tap(REASON, { reason: codes[0], start: first.start, end: first.end, operator: operator() });
      const rest = { reason: codes[1], start: second.start, operator: operator() };
      if (second.end) rest.end = second.end;
      tap(REASON, rest);
      closePicker();
    });
    return;
  }
  withOperator(() => {
    const body = { reason: code, start: p.start, operator: operator() };
    if (p.end) body.end = p.end;
    tap(REASON, body);
    if (p.kind !== "prompt") closePicker();
    else renderPicker(true);
  });
}

function pickerTitle(p) {
  if (p.kind === "prompt") return `Why is ${machine} ${tile.state === "offline" ? "offline" : "stopped"}?`;
  if (p.kind === "split-time") return `Split the stop ${span(p.stop.start, p.stop.end)}`;
  if (p.kind === "split") {
    const part = p.parts[p.codes.length];
    return `${p.codes.length ? "Second" : "First"} part, ${span(part.start, part.end)}: why stopped?`;
  }
  return `Why was ${machine} stopped ${span(p.start, p.end)}?`;
}

function choices(p) {
  const top = reasonTree(data.reasons);
  let node = top;
  for (const name of path) node = node.children.get(name) ?? node;
  const buttons = [...node.children.values()].map((child) =>
    child.kind
      ? h("button", { type: "button", class: `choice leaf ${child.kind}`, onclick: () => pick(p, child.code) },
          h("span", { class: "choice-name" }, child.name), " ",
          h("span", { class: "choice-kind" }, child.kind))
      : h("button", {
          type: "button", class: "choice branch",
          onclick: () => { path = [...path, child.name]; renderPicker(true); },
        },
        h("span", { class: "choice-name" }, child.name), " ",
        h("span", { class: "choice-kind" }, `${leafCount(child)} ${leafCount(child) === 1 ? "reason" : "reasons"}`, h("span", { "aria-hidden": "true" }, " ›"))));
  if (!buttons.length) return h("p", { class: "empty" }, "No reasons are configured for this station ([plant.reasons]).");
  return h("div", { class: "choices", role: "group", "aria-label": path.length ? `Reasons under ${path.join(" / ")}` : "Kinds of reason" }, buttons);
}

function splitForm(p) {
  const end = p.stop.end ?? new Date(hubNow()).toISOString();
  const middle = new Date((at(p.stop.start) + at(end)) / 2);
  const input = h("input", { id: "split-at", type: "time", step: "60", required: true, value: hhmm(middle.toISOString()) });
  const form = h("form", {
    class: "split-form",
    onsubmit: (e) => {
      e.preventDefault();
      if (!/^\d{2}:\d{2}/.test(input.value)) {
        showAlert("Give the time the stop changed reason (hours and minutes).");
        return;
      }
      const hi = p.stop.end ? at(p.stop.end) : hubNow();
      const t = wallTimes(at(p.stop.start), input.value.slice(0, 5)).find((ms) => ms > at(p.stop.start) && ms < hi);
      if (t === undefined) {
        showAlert(`${input.value.slice(0, 5)} is not within the stop ${span(p.stop.start, p.stop.end)}: choose a time between.`);
        return;
      }
      clearAlert();
      const cut = new Date(t).toISOString();
      chosen = {
        kind: "split", stop: p.stop, codes: [],
        parts: [{ start: p.stop.start, end: cut }, { start: cut, end: p.stop.end }],
      };
      renderPicker(true);
    },
  },
  h("label", { for: "split-at" }, "The second part starts at"),
  input,
  h("button", { type: "submit", class: "big" }, "Next: the reasons"));
  return form;
}

function renderPicker(moved = false) {
  const p = chosen ?? promptTarget();
  const identity = p ? `${p.kind}|${p.start ?? p.stop?.start}|${p.end ?? p.stop?.end}|${p.codes?.length ?? ""}` : "";
  if (identity !== pathOf) {
    path = [];
    pathOf = identity;
  }
  els.picker.hidden = !p;
  if (!p) {
    draw(els.picker, "", () => []);
    shownPicker = "";
    return;
  }
  const key = `${identity}|${path.join("/")}|${tile.state}|${JSON.stringify(data.reasons)}`;
  const appeared = shownPicker === "" && p.kind === "prompt";
  shownPicker = key;
  const changed = draw(els.picker, key, () => [
    h("h2", { id: "picker-title", tabindex: "-1" }, pickerTitle(p)),
    p.kind === "prompt"
      ? h("p", { class: "picker-sub" }, `${stateWord(tile.state)} since ${hhmm(p.start)}, for `,
          h("span", { "data-since": p.start }, length(p.start, null)), ": no reason given yet")
      : null,
    p.kind === "split-time" ? splitForm(p) : [
      h("p", { class: "picker-level" }, path.length ? `Reason: ${path.join(" / ")}` : "Choose a reason"),
      choices(p),
    ],
    h("div", { class: "picker-nav" },
      path.length ? h("button", { type: "button", class: "nav", onclick: () => { path = path.slice(0, -1); renderPicker(true); } },
        h("span", { "aria-hidden": "true" }, "‹ "), "Back") : null,
      chosen ? h("button", { type: "button", class: "nav", onclick: closePicker }, "Cancel") : null),
  ]);
  if (changed && moved) {
    const first = els.picker.querySelector(".choice, input, button");
    (first ?? $("picker-title"))?.focus({ preventScroll: true });
  }
  if (appeared) els.picker.scrollIntoView({ block: "nearest" });
}

// --- the tile ----------------------------------------------------------------------------------

function renderTile() {
  const t = tile;
  const shift = t.shift;
  els.tile.className = `tile state-${t.state}`;
  const key = JSON.stringify(t);
  draw(els.tile, key, () => [
    h("h2", { id: "tile-title", class: "tile-machine" }, t.machine_id, h("span", { class: "sr-only" }, " now")),
    h("p", { id: "tile-state", class: "tile-state" }, stateWord(t.state)),
    h("p", { class: "tile-reason" }, reasonWord(t.reason)),
    h("p", { class: "tile-time" }, "for ",
      t.since ? h("span", { class: "tile-since", "data-since": t.since }, since(t.since))
        : h("span", { class: "tile-since" }, "more than 12 h")),
    h("div", { class: "tile-order" }, t.order_id
      ? [
          h("p", {}, "Order ", h("strong", {}, t.order_id)),
          t.order_quantity ? [
            h("p", { class: "tile-count" }, h("strong", {}, t.order_good ?? 0), ` of ${t.order_quantity} good`),
            h("progress", { max: t.order_quantity, value: Math.min(t.order_good ?? 0, t.order_quantity),
              "aria-label": `Good parts of order ${t.order_id}` }),
          ] : null,
        ]
      : h("p", {}, "No order running")),
    h("div", { class: `tile-shift${shift?.provisional ? " provisional" : ""}` }, shift
      ? [
          h("p", { class: "tile-shift-name" }, `Shift ${shift.name} `,
            shift.provisional ? h("span", { class: "provisional-mark" }, "so far")
              : h("span", { class: "final-mark" }, "final")),
          h("dl", { class: "figures" },
            [["Availability", shift.availability], ["Performance", shift.performance],
              ["Quality", shift.quality], ["OEE", shift.oee]].map(([name, value]) =>
              h("div", { class: name === "OEE" ? "oee" : null }, h("dt", {}, name), h("dd", {}, percent(value))))),
        ]
      : h("p", { class: "tile-shift-name" }, "No shift figures now")),
  ]);
}

// --- the stops ---------------------------------------------------------------------------------

function pieceKind(piece) {
  if (piece.reason === UNASSIGNED) return UNASSIGNED;
  if (piece.state === "planned_stop") return "planned";
  return data.reasons?.[piece.reason] ?? "unplanned";
}

function stopItem(stop) {
  const waiting = waitingHere().filter((t) => t.type === REASON && at(t.data.start) >= at(stop.start)
    && (stop.end === null || at(t.data.start) < at(stop.end)));
  const label = `the stop ${span(stop.start, stop.end)}`;
  const several = stop.pieces.length > 1;
  return h("li", { class: `stop${stop.unassigned ? " unassigned" : ""}${stop.end ? "" : " ongoing"}` },
    h("p", { class: "stop-head" },
      h("span", { class: "stop-time" }, stop.end ? span(stop.start, stop.end) : `${hhmm(stop.start)}–now`),
      h("span", { class: "stop-length" }, length(stop.start, stop.end))),
    h("ul", { class: "pieces" }, stop.pieces.map((piece) => {
      const kind = pieceKind(piece);
      return h("li", { class: `piece ${kind}` },
        several ? h("span", { class: "piece-time" }, `${hhmm(piece.start)}–${hhmm(piece.end)} `) : null,
        h("span", { class: "piece-reason" }, reasonWord(piece.reason)),
        kind !== UNASSIGNED ? h("span", { class: "piece-kind" }, ` ${kind}`) : null);
    })),
    waiting.length
      ? h("p", { class: "stop-waiting" }, `Waiting to be sent: ${waiting.map((t) => t.data.reason).join(", ")}`)
      : null,
    h("div", { class: "stop-actions" },
      h("button", {
        type: "button", class: "act",
        onclick: () => openPicker({ kind: "stop", start: stop.start, end: stop.end }),
      }, stop.unassigned ? "Give reason" : "Change reason", h("span", { class: "sr-only" }, ` for ${label}`)),
      h("button", {
        type: "button", class: "act",
        onclick: () => openPicker({ kind: "split-time", stop }),
      }, "Split", h("span", { class: "sr-only" }, ` ${label} in two`))));
}

function renderStops() {
  const unassigned = data.stops.filter((s) => s.unassigned);
  const labelled = data.stops.filter((s) => !s.unassigned);
  const waiting = waitingHere().filter((t) => t.type === REASON);
  // Lengths of ongoing stops move on: drawn again each minute.
  const key = JSON.stringify([data.stops, waiting, Math.floor(hubNow() / 60_000)]);
  draw(els.stops, key, () => [
    !data.stops.length ? h("p", { class: "empty" }, "No stops this shift.") : null,
    unassigned.length ? [
      h("h3", {}, "Waiting for a reason"),
      h("ul", { class: "stop-list" }, unassigned.map(stopItem)),
    ] : null,
    labelled.length ? [
      h("h3", {}, "Labelled"),
      h("ul", { class: "stop-list" }, labelled.map(stopItem)),
    ] : null,
  ]);
}

// --- orders ------------------------------------------------------------------------------------

let confirmEnd = null; // the order whose end waits for a second tap

function renderOrders() {
  const running = data.orders.filter((o) => o.status === "running" || o.order_id === tile.order_id);
  const released = data.orders.filter((o) => !running.includes(o));
  const waiting = waitingHere().filter((t) => t.type === ORDER_STARTED || t.type === ORDER_ENDED);
  const key = JSON.stringify([data.orders, tile.order_id, tile.order_good, waiting, confirmEnd]);
  const details = (o) => h("span", { class: "order-details" },
    `${o.part_number} · ${o.quantity} pcs${o.due ? ` · due ${new Date(o.due).toLocaleDateString("en-GB", { timeZone: zone, day: "numeric", month: "short" })} ${hhmm(o.due)}` : ""}`);
  draw(els.orders, key, () => [
    running.map((o) => h("div", { class: "order running" },
      h("p", {}, "Running: ", h("strong", { class: "order-id" }, o.order_id), " ", details(o)),
      o.order_id === tile.order_id && tile.order_quantity
        ? h("p", { class: "order-count" }, `${tile.order_good ?? 0} of ${tile.order_quantity} good`) : null,
      confirmEnd === o.order_id
        ? h("div", { class: "confirm" },
            h("p", {}, `End order ${o.order_id} on ${machine}?`),
            h("button", {
              type: "button", class: "big danger",
              onclick: () => withOperator(() => { confirmEnd = null; tap(ORDER_ENDED, { order_id: o.order_id }); }),
            }, `Yes, end ${o.order_id}`),
            h("button", { type: "button", class: "big", onclick: () => { confirmEnd = null; renderOrders(); } }, "No"))
        : h("button", {
            type: "button", class: "big",
            onclick: () => { confirmEnd = o.order_id; renderOrders(); els.orders.querySelector(".confirm button:last-child")?.focus(); },
          }, `End order ${o.order_id}`))),
    released.length
      ? [
          h("h3", {}, "Released to this machine"),
          h("ul", { class: "order-list" }, released.map((o) => h("li", { class: "order" },
            h("p", {}, h("strong", { class: "order-id" }, o.order_id), " ", details(o)),
            h("button", {
              type: "button", class: "big",
              onclick: () => withOperator(() => tap(ORDER_STARTED, { order_id: o.order_id })),
            }, `Start ${o.order_id}`)))),
        ]
      : !running.length ? h("p", { class: "empty" }, `No orders released to ${machine}.`) : null,
    waiting.length
      ? h("p", { class: "order-waiting" }, `Waiting to be sent: ${waiting.map(describe).join("; ")}`)
      : null,
  ]);
}

// --- scrap -------------------------------------------------------------------------------------

function scrapReasons() {
  try {
    return JSON.parse(localStorage.getItem(SCRAP_REASONS_KEY) || "[]");
  } catch {
    return [];
  }
}

function renderScrap() {
  els.scrapOrder.textContent = tile.order_id
    ? `For order ${tile.order_id}`
    : "No order running: the scrap counts for the order running at its time, if any";
  draw(els.scrapReasons, JSON.stringify(scrapReasons()), () =>
    scrapReasons().map((r) => h("option", { value: r })));
}

function quantity() {
  const n = Number(els.scrapQuantity.value);
  return Number.isInteger(n) ? n : NaN;
}

$("scrap-less").addEventListener("click", () => {
  els.scrapQuantity.value = String(Math.max(1, (quantity() || 1) - 1));
});
$("scrap-more").addEventListener("click", () => {
  els.scrapQuantity.value = String(Math.min(100_000, (quantity() || 0) + 1));
});

els.scrapForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const n = quantity();
  const reason = els.scrapReason.value.trim();
  if (!(n >= 1 && n <= 100_000)) {
    showAlert("Scrap: give a whole number of parts, 1 or more.");
    els.scrapQuantity.focus();
    return;
  }
  if (!reason) {
    showAlert("Scrap: say why the parts are scrap.");
    els.scrapReason.focus();
    return;
  }
  withOperator(() => {
    const body = { quantity: n, reason: reason.slice(0, 256) };
    if (tile.order_id) body.order_id = tile.order_id;
    tap(SCRAP, body);
    const kept = [reason, ...scrapReasons().filter((r) => r !== reason)].slice(0, 8);
    localStorage.setItem(SCRAP_REASONS_KEY, JSON.stringify(kept));
    els.scrapQuantity.value = "1";
    els.scrapReason.value = "";
    clearAlert();
    renderScrap();
  });
});

// --- the link to the hub -----------------------------------------------------------------------

function renderLink() {
  const n = queue.waiting.length;
  const waitingText = n ? `${n} ${n === 1 ? "tap" : "taps"} waiting` : "";
  const down = document.body.classList.contains("disconnected");
  setLinkState(waitingText || (down ? "hub unreachable" : ""));
  els.waiting.textContent = n
    ? `${waitingText}: they are sent as soon as the hub can be reached.`
    : "";
}

new MutationObserver(renderLink).observe(document.body, { attributes: true, attributeFilter: ["class"] });

// --- everything --------------------------------------------------------------------------------

function render() {
  renderTile();
  renderPicker();
  renderStops();
  renderOrders();
  renderScrap();
  renderOperator();
  renderLink();
}

// The station's data again, one fetch at a time (asked again meanwhile: once more after it).
let fetching = false;
let fetchAgain = false;
async function refetch() {
  if (fetching) {
    fetchAgain = true;
    return;
  }
  fetching = true;
  try {
    do {
      fetchAgain = false;
      let response;
      try {
        response = await fetch(`/ui/station/${encodeURIComponent(machine)}/data`, {
          credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store",
        });
      } catch {
        break; // the hub cannot be reached: the live stream's return asks again
      }
      if (response.status === 401) {
        showAlert("This tablet is no longer signed in: taps wait until it is.", {
          href: `/ui/login?next=${encodeURIComponent(location.pathname)}`, text: "Sign in again",
        });
        break;
      }
      if (!response.ok) break;
      const fresh = await response.json();
      skew = Date.parse(fresh.now) - Date.now();
      data = fresh;
      tile = fresh.tile;
      render();
    } while (fetchAgain);
  } finally {
    fetching = false;
  }
}

// After a tap the hub's views take a moment: ask now and twice more (the live stream's views
// event usually comes first).
function refetchSoon() {
  refetch();
  setTimeout(refetch, 1000);
  setTimeout(refetch, 3000);
}

const sameTile = (a, b) => a.state === b.state && a.reason === b.reason && a.since === b.since
  && a.order_id === b.order_id && a.order_good === b.order_good;

live([machine], {
  tiles: ({ tiles, full }) => {
    const mine = tiles.find((t) => t.machine_id === machine);
    if (!mine) return;
    const changed = full || !sameTile(mine, tile);
    tile = mine;
    render();
    if (changed) refetch();
  },
  views: ({ machines }) => {
    if (machines.includes(machine)) refetch();
  },
});

els.scrapForm.querySelector("button[type=submit]").disabled = false;
render();
setInterval(renderPicker, 1000); // the prompt appears by itself when the stop has lasted
setInterval(renderStops, 15_000);
setInterval(refetch, 60_000); // without a live stream, too
queue.flush();
