// The OEE and orders pages: their figures fetched again (?partial=1) when the live stream
// says a machine they show changed — at most once a second, the last change never missed —
// and every `data-refresh-every` seconds if set; Pareto bars open their drill link.
import { live, addCsvButtons, signedOut } from "/ui/static/mes.js";

const part = document.querySelector("[data-live-refresh]");
const THROTTLE_MS = 1000;

function wireBars(root) {
  for (const bar of root.querySelectorAll(".pareto-bar[data-href]")) {
    bar.addEventListener("click", () => { window.location.assign(bar.dataset.href); });
  }
}

if (part) {
  const machines = (part.dataset.machines || "").split(" ").filter(Boolean);
  let last = 0;
  let timer = null;
  let fetching = false;
  let again = false;

  const refresh = async () => {
    if (fetching) { again = true; return; }
    fetching = true;
    last = Date.now();
    try {
      const url = new URL(window.location.href);
      url.searchParams.set("partial", "1");
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
      // Sent to the sign-in page: the session is over; say so, keep the figures shown.
      if (response.redirected) { signedOut(); return; }
      if (response.ok || response.status === 404 || response.status === 422) {
        const opened = new Set([...part.querySelectorAll("details[open]")].map((d) => d.querySelector("summary")?.textContent));
        part.innerHTML = await response.text();
        for (const d of part.querySelectorAll("details")) {
          if (opened.has(d.querySelector("summary")?.textContent)) d.open = true;
        }
        addCsvButtons(part);
        wireBars(part);
        part.dataset.refreshed = String(Date.now());
      }
    } catch {
      // The hub cannot be reached: the stream's own state says so; the next change tries again.
    } finally {
      fetching = false;
      if (again) { again = false; schedule(); }
    }
  };

  const schedule = () => {
    if (timer !== null) return;
    const wait = Math.max(0, last + THROTTLE_MS - Date.now());
    timer = setTimeout(() => { timer = null; refresh(); }, wait);
  };

  live(machines.length ? machines : null, {
    views: ({ machines: changed, full }) => {
      // The stream's first message: it is open.
      if (full) part.dataset.live = "open";
      else if (!machines.length || changed.some((m) => machines.includes(m))) schedule();
    },
  });
  const every = Number(part.dataset.refreshEvery || 0);
  if (every > 0) setInterval(schedule, every * 1000);
  wireBars(part);
}
