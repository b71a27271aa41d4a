// Browser test of the web UI in real headless Chromium (Debian's package), driven by
// playwright-core. Started by tests/playback.rs with the node's URL and what it recorded:
//   BASE_URL, TOKEN (to sign in with), NEEDLE, LONG_ID, LIVE_ID, ARTIFACTS (a directory for
//   the screenshots), CHROMIUM (path).
// Exits non-zero with a message on the first failed check.
"use strict";
const { chromium } = require("playwright-core");
const path = require("path");

const base = process.env.BASE_URL;
const needle = process.env.NEEDLE;
const longId = process.env.LONG_ID;
const artifacts = process.env.ARTIFACTS;
const liveId = process.env.LIVE_ID;
const token = process.env.TOKEN;
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

function check(ok, message) {
  if (!ok) throw new Error(message);
}

async function screenText(page) {
  return page.evaluate(() => {
    const el = document.querySelector(".ap-term-text");
    return el ? el.textContent : "";
  });
}

async function waitForScreen(page, want, what) {
  try {
    await page.waitForFunction(
      (w) => {
        const el = document.querySelector(".ap-term-text");
        return el !== null && el.textContent.includes(w);
      },
      want,
      { timeout: 20000 },
    );
  } catch (e) {
    throw new Error(`${what}: the player never showed ${JSON.stringify(want)}; screen: ${JSON.stringify(await screenText(page))}`);
  }
}

(async () => {
  const browser = await chromium.launch({
    executablePath,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1300, height: 1000 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));

    // Signing in: the list sends an unknown browser to the login page, which comes back.
    await page.goto(base + "/?sshUser=");
    check(page.url().includes("/login?next="), "an unauthenticated visit should land on the login page");
    await page.fill("input[name=token]", "not-the-token");
    await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
    check((await page.locator("p.error").count()) === 1, "a wrong token should be refused");
    await page.fill("input[name=token]", token);
    await Promise.all([page.waitForNavigation(), page.click("form.login button[type=submit]")]);
    check(new URL(page.url()).pathname === "/", "signing in should return to the list");

    // The list shows every recording.
    await page.goto(base + "/");
    check((await page.locator("tr.recording").count()) === 4, "the list should show 3 stored recordings and the live one");
    check((await page.locator("td.status.live").count()) === 1, "the live recording should be marked live");

    // Filtering by SSH user.
    await page.fill("input[name=sshUser]", "bob");
    await Promise.all([page.waitForNavigation(), page.click("form.filters button[type=submit]")]);
    check((await page.locator("tr.recording").count()) === 1, "filtering by sshUser=bob should leave 1 row");
    check((await page.locator("tr.recording").first().textContent()).includes("bob"), "the row should be bob's");

    // Full-text search, then jump to the hit.
    await page.goto(base + "/");
    await page.fill("input[name=q]", needle);
    await Promise.all([page.waitForNavigation(), page.click("form.filters button[type=submit]")]);
    const hit = page.locator("a.hit").first();
    check((await hit.count()) === 1, "the search should list a hit");
    check((await hit.locator("mark").textContent()).includes(needle.split("-")[0]), "the hit should highlight the match");
    await Promise.all([page.waitForNavigation(), hit.click()]);
    check(page.url().includes("/play/" + longId), "the hit should open the long recording");
    await waitForScreen(page, needle, "jump to hit");
    check(await page.evaluate(() => document.querySelector("#player pre.screen") === null &&
      document.querySelector("#player .pending") === null), "the player should have taken the drawn screen's place");

    // Seek to 1:30 with the seek bar: the screen shows what was printed then.
    await page.evaluate(() => {
      const seek = document.getElementById("seek");
      seek.value = "90";
      seek.dispatchEvent(new Event("change"));
    });
    await waitForScreen(page, "step 899", "seek to 90 s");
    await page.screenshot({ path: path.join(artifacts, "player.png") });

    // Watch a live session: what was sent before the page opened is on screen, and a line
    // the test client sends after it appears without a reload.
    await page.goto(base + "/play/" + liveId);
    await waitForScreen(page, "live-before-9", "live view");
    console.log("LIVE-OPENED");
    await waitForScreen(page, "LIVE-MARKER", "live view after open");
    await page.screenshot({ path: path.join(artifacts, "live.png") });
    check(errors.length === 0, "page errors: " + errors.join("; "));
    console.log("browser test passed");
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
