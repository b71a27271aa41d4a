// Loads a recording into asciinema-player one window at a time (the chunk holding the wanted
// time, painted from the index's snapshot, plus the next chunk), so seeking anywhere reads two
// chunks, never the whole recording. The next window loads when one ends.
// Live view: the player's eventsource driver follows the node's server-sent events.
(function () {
  "use strict";
  const el = document.getElementById("live");
  if (!el || !window.AsciinemaPlayer) return;
  const player = AsciinemaPlayer.create(
    { driver: "eventsource", url: el.dataset.url, bufferTime: 0 },
    el,
    { autoPlay: true, fit: "width" },
  );
  player.addEventListener("ended", function () {
    document.getElementById("live-ended").hidden = false;
  });
})();

(function () {
  "use strict";
  const el = document.getElementById("player");
  if (!el || !window.AsciinemaPlayer) return;
  const id = el.dataset.id;
  const duration = parseFloat(el.dataset.duration) || 0;
  const speed = document.getElementById("speed");
  const idle = document.getElementById("idle");
  const seek = document.getElementById("seek");
  const pos = document.getElementById("pos");
  let player = null;
  let windowStart = 0;
  let next = null;
  let loading = 0;
  let playing = false;

  function clock(s) {
    s = Math.max(0, Math.floor(s));
    const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
    const mm = h ? String(m).padStart(2, "0") : String(m);
    return (h ? h + ":" : "") + mm + ":" + String(r).padStart(2, "0");
  }

  function now() {
    return player ? windowStart + (player.getCurrentTime() || 0) : windowStart;
  }

  async function load(t, autoPlay) {
    const token = ++loading;
    let text, n;
    // The page carries the first window; later ones are fetched.
    const embedded = document.getElementById("first-window");
    if (embedded && embedded.dataset.from === String(t)) {
      embedded.remove();
      text = JSON.parse(embedded.textContent);
      windowStart = parseFloat(embedded.dataset.start || "0");
      n = embedded.dataset.next === "" ? null : embedded.dataset.next;
    } else {
      const response = await fetch("/api/v1/recordings/" + encodeURIComponent(id) + "/window?from=" + t);
      if (token !== loading) return;
      if (!response.ok) {
        el.textContent = "Cannot load the recording: HTTP " + response.status;
        return;
      }
      text = await response.text();
      windowStart = parseFloat(response.headers.get("x-castvault-window-start") || "0");
      n = response.headers.get("x-castvault-next");
    }
    if (token !== loading) return;
    next = n === null ? null : parseFloat(n);
    if (player) player.dispose();
    el.replaceChildren();
    const opts = {
      startAt: Math.max(0, t - windowStart),
      autoPlay: autoPlay,
      preload: true,
      speed: parseFloat(speed.value) || 1,
      fit: "width",
    };
    if (idle.value) opts.idleTimeLimit = parseFloat(idle.value);
    // Paused: show the frame at the start time until play is pressed.
    // (the window paints the screen with an event at 0, which the frame at 0 would not show yet)
    if (!autoPlay) opts.poster = "npt:" + Math.max(opts.startAt, 0.001);
    player = AsciinemaPlayer.create({ data: text }, el, opts);
    playing = autoPlay;
    player.addEventListener("play", function () { playing = true; });
    player.addEventListener("playing", function () { playing = true; });
    player.addEventListener("pause", function () { playing = false; });
    player.addEventListener("ended", function () {
      playing = false;
      if (next !== null) load(next, true);
    });
    el.dataset.windowStart = String(windowStart);
    el.dataset.loaded = String(t);
  }

  // Settings and seeks keep playing or paused as they were.
  speed.addEventListener("change", function () { load(now(), playing); });
  idle.addEventListener("change", function () { load(now(), playing); });
  seek.addEventListener("change", function () { load(parseFloat(seek.value), playing); });
  document.addEventListener("keydown", function (e) {
    if (e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement) return;
    const i = speed.selectedIndex;
    if (e.key === ">" && i < speed.options.length - 1) { speed.selectedIndex = i + 1; load(now(), playing); }
    if (e.key === "<" && i > 0) { speed.selectedIndex = i - 1; load(now(), playing); }
  });
  setInterval(function () {
    const t = Math.min(now(), duration);
    if (document.activeElement !== seek) seek.value = String(t);
    pos.textContent = clock(t);
  }, 250);
  // Opened at a moment (a search hit): show that moment, paused. Otherwise play from the start.
  const start = parseFloat(el.dataset.start) || 0;
  load(start, el.dataset.paused !== "true");
})();
