// The plant board: each tile redrawn in place from the live stream's tiles (hub/ui/live.py),
// in the markup of templates/board_tiles.html, and the tiles kept in the board's order.
import { live, since } from "/ui/static/mes.js";

const board = document.getElementById("board");
const station = board?.dataset.station === "1";
const DOWN = new Set(["stopped", "offline"]);
const WORDS = {
  running: "Running", stopped: "Stopped", offline: "Offline", planned_stop: "Planned stop",
  no_shift: "No shift", not_commissioned: "Not commissioned",
};
const ICONS = {
  running: "▶", stopped: "■", offline: "✕", planned_stop: "‖", no_shift: "–", not_commissioned: "–",
};
const LOOKBACK_H = 12; // hub/ui/floor.py LOOKBACK

const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => ({
  "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
}[c]));
const word = (state) => WORDS[state] ?? (state.charAt(0).toUpperCase() + state.slice(1)).replace(/_/g, " ");
const percent = (x) => (x === null || x === undefined ? "—" : `${(x * 100).toFixed(1)} %`);

function inner(t) {
  const id = esc(t.machine_id);
  const q = encodeURIComponent(t.machine_id);
  const shift = t.shift;
  const reason = t.reason
    ? `Reason: <span class="reason-code${t.reason === "unassigned" ? " unassigned" : ""}">${esc(t.reason)}</span>`
    : "&nbsp;";
  const sinceSpan = t.since
    ? `<span data-since="${esc(t.since)}">${esc(since(t.since))}</span>`
    : `<span>over ${LOOKBACK_H} h</span>`;
  let oee = "no shift now";
  let parts = "—";
  if (shift) {
    oee = percent(shift.oee) + (shift.provisional ? ' <span class="provisional-mark">provisional</span>' : "");
    parts = `${esc(shift.produced)} made` +
      (shift.target !== null && shift.target !== undefined ? ` / target ${esc(shift.target)}` : " / no target yet");
  }
  let order = "none";
  if (t.order_id) {
    order = esc(t.order_id);
    if (t.order_quantity !== null && t.order_quantity !== undefined) {
      order += ` · ${esc(t.order_good ?? 0)} / ${esc(t.order_quantity)} good`;
    }
  }
  const oeeValue = shift && shift.oee !== null && shift.oee !== undefined ? shift.oee : "";
  return `<h2 class="tile-machine"><a href="/ui/oee?machine=${q}">${id}</a></h2>
  <p class="tile-state"><span class="state-icon" aria-hidden="true">${ICONS[t.state] ?? "–"}</span>
    <span class="state-word">${esc(word(t.state))}</span></p>
  <p class="tile-reason">${reason}</p>
  <p class="tile-since">for ${sinceSpan}</p>
  <dl class="tile-figures">
    <div><dt>OEE${shift ? ` (${esc(shift.name)})` : ""}</dt>
      <dd class="tile-oee${shift && shift.provisional ? " provisional" : ""}" data-value="${esc(oeeValue)}">${oee}</dd></div>
    <div><dt>Parts</dt><dd class="tile-parts">${parts}</dd></div>
    <div><dt>Order</dt><dd class="tile-order">${order}</dd></div>
  </dl>
  <p class="tile-links"><a href="/ui/oee?machine=${q}" aria-label="OEE of ${id}">OEE</a>${
    station ? ` <a href="/ui/station/${q}" aria-label="Station of ${id}">Station</a>` : ""}</p>`;
}

function draw(li, t) {
  li.className = `tile state-${t.state}`;
  li.dataset.machine = t.machine_id;
  li.dataset.state = t.state;
  li.dataset.oee = t.shift && t.shift.oee !== null && t.shift.oee !== undefined ? t.shift.oee : "";
  li.innerHTML = inner(t);
}

function tilesList() {
  let list = board.querySelector("ul.tiles");
  if (!list) {
    board.querySelector(".empty")?.remove();
    list = document.createElement("ul");
    list.className = "tiles";
    list.setAttribute("aria-label", "Machines");
    board.append(list);
  }
  return list;
}

const compare = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

// hub/ui/board.py worst_first: stopped and offline first, then the lowest OEE, then the id.
function key(li) {
  const oee = li.dataset.oee === "" ? Infinity : Number(li.dataset.oee);
  return [DOWN.has(li.dataset.state) ? 0 : 1, oee, li.dataset.machine];
}

function reorder(list) {
  const tiles = [...list.children];
  const worst = board.dataset.sort === "worst";
  const sorted = [...tiles].sort((a, b) => {
    if (!worst) return compare(a.dataset.machine, b.dataset.machine);
    const [ka, kb] = [key(a), key(b)];
    return compare(ka[0], kb[0]) || compare(ka[1], kb[1]) || compare(ka[2], kb[2]);
  });
  if (sorted.some((li, i) => li !== tiles[i])) list.append(...sorted);
}

function onTiles({ tiles, full, position }) {
  const list = tilesList();
  const seen = new Set();
  for (const t of tiles) {
    seen.add(t.machine_id);
    let li = document.getElementById(`tile-${t.machine_id}`);
    if (!li) {
      li = document.createElement("li");
      li.id = `tile-${t.machine_id}`;
      list.append(li);
    }
    draw(li, t);
  }
  if (full) {
    for (const li of [...list.children]) if (!seen.has(li.dataset.machine)) li.remove();
  }
  reorder(list);
  board.dataset.position = position;
}

if (board) {
  live(null, {
    tiles: onTiles,
    views: ({ position }) => { board.dataset.viewsPosition = position; },
  });
}
