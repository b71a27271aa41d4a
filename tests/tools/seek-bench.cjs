// Seek benchmark in real headless Chromium: opens the player page of RECORDING at AT seconds,
// ROUNDS times (default 7), each in a fresh browser context (nothing cached: a cold page) and
// then once more in that context (warm). Per page it reports when the screen at the seek point
// (drawn by the server into the page) was painted (no earlier than the page's first paint) and
// when the player's first frame came; it fails if the two differ in text. Then medians and the
// worst page. Used by benches/playback.rs.
"use strict";
const { chromium } = require("playwright-core");

const rounds = parseInt(process.env.ROUNDS || "7", 10);

// The characters of a screen without its whitespace: the server's <pre> and the player's DOM
// lay out blank cells differently, but must show the same text in the same order.
function glyphs(text) {
  return text.replace(/[\s\u00a0]+/g, "");
}

function drawnScreen(html) {
  const m = /<pre class="screen"[^>]*>([\s\S]*?)<\/pre>/.exec(html);
  if (!m) throw new Error("the page came without the screen at the seek point");
  return m[1]
    .replace(/<[^>]*>/g, "")
    .replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&quot;/g, "\"").replace(/&#39;/g, "'")
    .replace(/&amp;/g, "&");
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1];
}

// In the page before anything else: once the drawn screen is parsed whole (the element after
// it exists), the time after the next frame is painted (a task posted from the frame's
// animation callback runs after its paint).
function watchScreen() {
  window.__screenPainted = NaN;
  const seen = new MutationObserver(function () {
    if (!document.querySelector("#player + p.keys")) return;
    seen.disconnect();
    if (!document.querySelector("#player pre.screen")) return;
    requestAnimationFrame(function () {
      const channel = new MessageChannel();
      channel.port1.onmessage = function () { window.__screenPainted = performance.now(); };
      channel.port2.postMessage(0);
    });
  });
  seen.observe(document, { childList: true, subtree: true });
}

async function open(context, url) {
  const page = await context.newPage();
  await page.addInitScript(watchScreen);
  const served = await page.goto(url, { waitUntil: "commit" });
  await page.waitForFunction(() => {
    const el = document.querySelector(".ap-term-text");
    return el !== null && el.textContent.trim().length > 0;
  }, null, { timeout: 30000, polling: 5 });
  const t = await page.evaluate(() => {
    const nav = performance.getEntriesByType("navigation")[0];
    const js = performance.getEntriesByType("resource").find((r) => r.name.includes("asciinema-player.min.js"));
    const paint = performance.getEntriesByType("paint").find((p) => p.name === "first-contentful-paint");
    return {
      frame: performance.now(),
      firstPaint: paint ? paint.startTime : NaN,
      screen: window.__screenPainted,
      page: nav ? nav.responseEnd : NaN,
      parsed: nav ? nav.domContentLoadedEventEnd : NaN,
      js: js ? js.responseEnd : NaN,
      player: document.querySelector(".ap-term-text").textContent,
      handedOver: document.querySelector("#player pre.screen") === null && document.querySelector("#player .pending") === null,
    };
  });
  const drawn = glyphs(drawnScreen(await served.text()));
  if (drawn.length === 0) throw new Error("the drawn screen at the seek point is blank");
  if (drawn !== glyphs(t.player)) {
    throw new Error(`the drawn screen and the player's first frame differ:\n${drawn}\n${glyphs(t.player)}`);
  }
  if (!t.handedOver) throw new Error("the player showed its frame but the drawn screen is still there");
  // The drawn screen shows no earlier than the page's first paint (a presentation time) nor
  // than the frame it was laid out in; unless the player took its place first.
  t.first = t.screen > 0 ? Math.min(Math.max(t.screen, t.firstPaint), t.frame) : t.frame;
  await page.close();
  return t;
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const url = process.env.BASE_URL + "/play/" + process.env.RECORDING + "?t=" + process.env.AT;
  const runs = { cold: [], warm: [] };
  try {
    for (let i = 0; i < rounds; i++) {
      const context = await browser.newContext({
        extraHTTPHeaders: { authorization: "Bearer " + process.env.TOKEN },
        viewport: { width: 1300, height: 1000 },
      });
      for (const run of ["cold", "warm"]) {
        const t = await open(context, url);
        runs[run].push(t);
        console.log(`seek: browser, ${run} page: first frame at ${t.first.toFixed(0)} ms (the screen at the seek point as the server drew it, the same text as the player's frame, painted at ${t.screen > 0 ? t.screen.toFixed(0) + " ms" : "never (the player came first)"}; first paint of the page at ${t.firstPaint.toFixed(0)} ms); ` +
          `player's first frame at ${t.frame.toFixed(0)} ms (page HTML at ${t.page.toFixed(0)} ms, player script at ${t.js.toFixed(0)} ms, page parsed and scripts run at ${t.parsed.toFixed(0)} ms)`);
      }
      await context.close();
    }
  } finally {
    await browser.close();
  }
  for (const run of ["cold", "warm"]) {
    const first = runs[run].map((t) => t.first);
    const player = runs[run].map((t) => t.frame);
    console.log(`seek: browser, ${run} pages (${rounds}): first frame median ${median(first).toFixed(0)} ms, worst ${Math.max(...first).toFixed(0)} ms; ` +
      `player's first frame median ${median(player).toFixed(0)} ms, worst ${Math.max(...player).toFixed(0)} ms`);
  }
})().catch((e) => {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
