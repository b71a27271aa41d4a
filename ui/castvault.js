// Loads a recording into asciinema-player one window at a time (the chunk holding the wanted
// time, painted from the index's snapshot, plus the next chunk), so seeking anywhere reads two
// chunks, never the whole recording. The next window loads when one ends.
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
    const response = await fetch("/api/v1/recordings/" + encodeURIComponent(id) + "/window?from=" + t);
    if (token !== loading) return;
    if (!response.ok) {
      el.textContent = "Cannot load the recording: HTTP " + response.status;
      return;
    }
    const text = await response.text();
    windowStart = parseFloat(response.headers.get("x-castvault-window-start") || "0");
    const n = response.headers.get("x-castvault-next");
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
    player = AsciinemaPlayer.create({ data: text }, el, opts);
    player.addEventListener("ended", function () {
      if (next !== null) load(next, true);
    });
    el.dataset.windowStart = String(windowStart);
    el.dataset.loaded = String(t);
  }

  function reload(autoPlay) {
    load(now(), autoPlay);
  }

  speed.addEventListener("change", function () { reload(true); });
  idle.addEventListener("change", function () { reload(true); });
  seek.addEventListener("change", function () { load(parseFloat(seek.value), true); });
  document.addEventListener("keydown", function (e) {
    if (e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement) return;
    const i = speed.selectedIndex;
    if (e.key === ">" && i < speed.options.length - 1) { speed.selectedIndex = i + 1; reload(true); }
    if (e.key === "<" && i > 0) { speed.selectedIndex = i - 1; reload(true); }
  });
  setInterval(function () {
    const t = Math.min(now(), duration);
    if (document.activeElement !== seek) seek.value = String(t);
    pos.textContent = clock(t);
  }, 250);
  load(parseFloat(el.dataset.start) || 0, true);
})();
