// Loads a recording into asciinema-player one window at a time (the chunk holding the wanted
// time, painted from the index's snapshot, plus the next chunk), so seeking anywhere reads two
// chunks, never the whole recording. The next window loads when one ends.
// Live view: the player's eventsource driver follows the node's server-sent events.
// The page's head preloads the player script; it runs only after the page has painted, so the
// screen the server drew into the page shows before the player's work begins.

let playerScript = null;

function withPlayer(start) {
  "use strict";
  if (!playerScript) {
    playerScript = new Promise(function (resolve, reject) {
      requestAnimationFrame(function () {
        setTimeout(function () {
          const script = document.createElement("script");
          script.src = "/assets/asciinema-player.min.js";
          script.onload = resolve;
          script.onerror = reject;
          document.head.appendChild(script);
        }, 0);
      });
    });
  }
  playerScript.then(start, function () { console.error("castvault: the player script did not load"); });
}

(function () {
  "use strict";
  const el = document.getElementById("live");
  if (!el) return;
  withPlayer(function () {
    const player = AsciinemaPlayer.create(
      { driver: "eventsource", url: el.dataset.url, bufferTime: 0 },
      el,
      { autoPlay: true, fit: "width" },
    );
    player.addEventListener("ended", function () {
      document.getElementById("live-ended").hidden = false;
    });
  });
})();

(function () {
  "use strict";
  const el = document.getElementById("player");
  if (el) withPlayer(function () { play(el); });
})();

function play(el) {
  "use strict";
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

  // The element the next player goes in. The screen the server drew (the page's first frame)
  // stays until the player has painted its own first frame over it, so the moment the page
  // opened on never blinks out while the player starts.
  function stage() {
    const drawn = el.querySelector("pre.screen");
    if (!drawn || !drawn.textContent.trim()) {
      el.replaceChildren();
      return el;
    }
    const host = document.createElement("div");
    host.className = "pending";
    el.replaceChildren(drawn, host);
    const shown = function () {
      const text = host.querySelector(".ap-term-text");
      return text !== null && text.textContent.trim().length > 0;
    };
    const reveal = function () {
      watch.disconnect();
      clearTimeout(timer);
      if (host.parentNode !== el) return;
      drawn.remove();
      host.className = "";
    };
    const watch = new MutationObserver(function () { if (shown()) reveal(); });
    watch.observe(host, { childList: true, subtree: true, characterData: true });
    // Whatever happens, the player shows after this long.
    const timer = setTimeout(reveal, 3000);
    return host;
  }

  // The size and the painting event at 0 a window opens with, if it has them.
  function openingScreen(text) {
    const lines = text.split("\n", 2);
    try {
      const header = JSON.parse(lines[0]);
      const first = JSON.parse(lines[1]);
      if (!Array.isArray(first) || first[0] !== 0 || first[1] !== "o" || typeof first[2] !== "string") return null;
      if (!(header.width > 0 && header.height > 0)) return null;
      return { cols: header.width, rows: header.height, init: first[2] };
    } catch (e) {
      return null;
    }
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
    const host = stage();
    const opts = {
      startAt: Math.max(0, t - windowStart),
      autoPlay: autoPlay,
      preload: true,
      speed: parseFloat(speed.value) || 1,
      fit: "width",
    };
    if (idle.value) opts.idleTimeLimit = parseFloat(idle.value);
    // Paused: show the frame at the start time until play is pressed. A window that starts at
    // that time opens with one event at 0 that paints the screen as it was then: the player
    // shows that as its poster, without parsing the window until play is pressed.
    if (!autoPlay) {
      const screen = opts.startAt === 0 ? openingScreen(text) : null;
      if (screen) {
        opts.poster = "data:text/plain," + screen.init;
        opts.cols = screen.cols;
        opts.rows = screen.rows;
        opts.preload = false;
      } else {
        opts.poster = "npt:" + Math.max(opts.startAt, 0.001);
      }
    }
    player = AsciinemaPlayer.create({ data: text }, host, opts);
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
}
