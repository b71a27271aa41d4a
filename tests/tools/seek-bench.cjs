// Seek benchmark in real headless Chromium: opens the player page of RECORDING at AT seconds
// in a fresh browser context (nothing cached) and reports the time from navigation start to
// the first painted frame, then the same in the warm context. Used by benches/playback.rs.
"use strict";
const { chromium } = require("playwright-core");

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const context = await browser.newContext({
      extraHTTPHeaders: { authorization: "Bearer " + process.env.TOKEN },
      viewport: { width: 1300, height: 1000 },
    });
    const url = process.env.BASE_URL + "/play/" + process.env.RECORDING + "?t=" + process.env.AT;
    for (const run of ["cold", "warm", "warm"]) {
      const page = await context.newPage();
      const served = await page.goto(url, { waitUntil: "commit" });
      await page.waitForFunction(() => {
        const el = document.querySelector(".ap-term-text");
        return el !== null && el.textContent.trim().length > 0;
      }, null, { timeout: 30000, polling: 5 });
      const t = await page.evaluate(() => {
        const nav = performance.getEntriesByType("navigation")[0];
        const res = performance.getEntriesByType("resource");
        const pick = (s) => res.find((r) => r.name.includes(s));
        const win = pick("/window");
        const js = pick("asciinema-player.min.js");
        const paint = performance.getEntriesByType("paint").find((p) => p.name === "first-contentful-paint");
        return {
          frame: performance.now(),
          firstPaint: paint ? paint.startTime : 0,
          page: nav ? nav.responseEnd : 0,
          js: js ? js.responseEnd : 0,
          winStart: win ? win.startTime : 0,
          winEnd: win ? win.responseEnd : 0,
          winBytes: win ? win.transferSize || win.encodedBodySize : 0,
        };
      });
      const html = await served.text();
      if (!/<pre class="screen">[^<]*\S/.test(html)) throw new Error("the page came without the screen at the seek point");
      console.log(`seek: browser, ${run} page: first paint (the server-drawn screen at the seek point) at ${t.firstPaint.toFixed(0)} ms; player's first frame at ${t.frame.toFixed(0)} ms ` +
        `(page HTML at ${t.page.toFixed(0)} ms, player script at ${t.js.toFixed(0)} ms, window requested at ${t.winStart.toFixed(0)} ms ` +
        `and received at ${t.winEnd.toFixed(0)} ms, ${(t.winBytes / 1e6).toFixed(2)} MB)`);
      await page.close();
    }
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
