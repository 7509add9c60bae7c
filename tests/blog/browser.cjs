"use strict";
// The blog demo's page in Debian's Chromium (headless, playwright-core), through the round-robin
// front of a three-instance cluster, launched like tests/interop/browser.cjs does it (same flags;
// playwright gives every launch a fresh, throw-away profile directory).
//
// Pages: "ada" (admin) and "bob" (follows alice), each in its own browser context. Prints one JSON
// line per check: {"name", "ok", "detail", "ms"}; screenshots go to <artifacts>/.
//
// Usage: node tests/blog/browser.cjs <config.json>
//   config: {front, chromium, artifacts, instances: [{name, url, pid}]}

const fs = require("node:fs");
const path = require("node:path");
const { chromium } = require("playwright-core");

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const WAIT_MS = 8000; // one expected event
const QUIET_MS = 700; // how long "nothing arrives" is watched
const CHECK_TIMEOUT_MS = 30000;

function emit(name, ok, detail, started) {
  process.stdout.write(`${JSON.stringify({ name, ok, detail: detail || "", ms: Date.now() - started })}\n`);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let failed = false;

async function check(name, body) {
  const started = Date.now();
  try {
    const detail = await withTimeout(Promise.resolve().then(body), CHECK_TIMEOUT_MS, name);
    emit(name, true, detail, started);
  } catch (err) {
    failed = true;
    emit(name, false, String((err && err.stack) || err), started);
  }
}

// -- REST calls straight to one instance (Node's fetch) -------------------------------------------

async function rest(base, method, route, body, token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(`${base}${route}`, { method, headers, body: body && JSON.stringify(body) });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${base}${route}: ${response.status} ${text}`);
  return JSON.parse(text);
}

const login = async (base, user, admin = false) => (await rest(base, "POST", "/api/login", { user, admin })).token;

async function publishVia(base, token, title) {
  const post = await rest(base, "POST", "/api/posts", { title, body: "written by the browser test" }, token);
  await rest(base, "POST", `/api/posts/${post.id}/publish`, undefined, token);
  return post.id;
}

// -- the page --------------------------------------------------------------------------------------

async function openPage(browser, user, admin) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 820 } });
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (err) => page.errors.push(String(err)));
  await page.goto(`${config.front}/`, { timeout: 15000 });
  await page.fill("#login-user", user);
  if (admin) await page.check("#login-admin");
  await page.click("#login-form button");
  await connected(page, 0);
  return page;
}

/** Waits until the page reports "connected" on its (count+1)-th instance; returns that instance. */
async function connected(page, count) {
  await page.waitForFunction(
    (n) => document.getElementById("state").textContent === "connected" && window.blog.instances.length > n,
    count,
    { timeout: WAIT_MS },
  );
  return page.evaluate(() => window.blog.instances[window.blog.instances.length - 1]);
}

async function reconnect(page) {
  const count = await page.evaluate(() => window.blog.instances.length);
  await page.click("#reconnect");
  return connected(page, count);
}

const present = (page, selector) =>
  page.waitForSelector(selector, { state: "attached", timeout: WAIT_MS }).then(() => true);
const count = (page, selector) => page.locator(selector).count();

async function shot(page, name) {
  await page.screenshot({ path: path.join(config.artifacts, `${name}.png`), fullPage: true });
}

async function main() {
  fs.mkdirSync(config.artifacts, { recursive: true });
  const byName = new Map(config.instances.map((i) => [i.name, i]));
  const browser = await chromium.launch({
    executablePath: config.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    timeout: 30000,
  });
  let ada;
  let bob;
  let adaInstance;
  let bobInstance;
  let third;
  const alice = await login(config.instances[0].url, "alice");
  const root = await login(config.instances[1].url, "root", true);
  try {
    await check("pages_connect_through_the_front", async () => {
      ada = await openPage(browser, "ada", true);
      bob = await openPage(browser, "bob", false);
      adaInstance = await ada.evaluate(() => window.blog.instances[0]);
      bobInstance = await bob.evaluate(() => window.blog.instances[0]);
      return `ada on ${adaInstance}, bob on ${bobInstance}`;
    });
    await check("pages_on_different_instances", async () => {
      // round robin, no affinity: each Reconnect (negotiate + WebSocket) lands elsewhere; bounded
      for (let i = 0; i < 3 && bobInstance === adaInstance; i++) bobInstance = await reconnect(bob);
      if (!byName.has(adaInstance) || !byName.has(bobInstance)) throw new Error(`unknown instance ${adaInstance} / ${bobInstance}`);
      if (adaInstance === bobInstance) throw new Error(`both on ${adaInstance}`);
      third = config.instances.find((i) => i.name !== adaInstance && i.name !== bobInstance);
      await shot(ada, "01-ada-connected");
      await shot(bob, "01-bob-connected");
      return `ada on ${adaInstance}, bob on ${bobInstance}, publishing through ${third.name}`;
    });
    await check("bob_follows_alice", async () => {
      await bob.fill("#follow-author", "alice");
      await bob.click("#follow-form button");
      await present(bob, '#follows li[data-author="alice"]');
    });

    let postId;
    await check("post_published_on_third_instance_reaches_both_pages", async () => {
      postId = await publishVia(third.url, alice, "Hello from the third instance");
      await present(ada, `#feed li[data-id="${postId}"]`);
      await present(bob, `#feed li[data-id="${postId}"]`);
      const text = await ada.locator(`#feed li[data-id="${postId}"]`).innerText();
      if (!text.includes("Hello from the third instance") || !text.includes("alice")) throw new Error(text);
      return `post #${postId} via ${third.url}`;
    });
    await check("follower_gets_author_posted", async () => {
      await present(bob, `#author-feed li[data-id="${postId}"]`);
    });
    await check("non_follower_gets_no_author_posted", async () => {
      await sleep(QUIET_MS);
      const n = await count(ada, "#author-feed li");
      if (n !== 0) throw new Error(`ada got ${n} AuthorPosted`);
      await shot(bob, "02-bob-post-and-author-posted");
      await shot(ada, "02-ada-post-no-author-posted");
    });
    await check("page_publishes_and_both_see_it", async () => {
      await bob.fill("#post-title", "Bob writes from the page");
      await bob.click("#post-form button");
      const title = '#feed li .title:text-is("Bob writes from the page")';
      await present(ada, title);
      await present(bob, title);
    });

    const alertText = `Disk almost full ${Date.now()}`;
    await check("only_admin_pages_show_alerts", async () => {
      if (!(await ada.isVisible("#admin"))) throw new Error("the admin panel is hidden for ada");
      if (await bob.isVisible("#admin")) throw new Error("the admin panel shows for bob");
      await rest(third.url, "POST", "/api/alerts", { message: alertText }, root);
      await ada.waitForSelector(`#alerts li:has-text("${alertText}")`, { timeout: WAIT_MS });
      await sleep(QUIET_MS);
      const n = await count(bob, "#alerts li");
      if (n !== 0) throw new Error(`bob got ${n} alerts`);
      await shot(ada, "03-ada-alert");
      await shot(bob, "03-bob-no-alert");
    });
    await check("non_admin_cannot_send_alerts", async () => {
      const bobToken = await login(third.url, "bob");
      try {
        await rest(third.url, "POST", "/api/alerts", { message: "nope" }, bobToken);
      } catch (err) {
        if (String(err).includes(" 403 ")) return "403";
        throw err;
      }
      throw new Error("bob sent an alert");
    });

    await check("instance_dies_page_reconnects_elsewhere_and_rejoins_groups", async () => {
      const victim = byName.get(adaInstance);
      const seen = await ada.evaluate(() => window.blog.instances.length);
      process.kill(victim.pid, "SIGKILL");
      await ada.waitForFunction(() => window.blog.states.includes("reconnecting"), null, { timeout: WAIT_MS });
      const now = await connected(ada, seen);
      if (now === victim.name) throw new Error(`still on ${now}`);
      await shot(ada, "04-ada-reconnected");
      // on_connected put the new connection back in "admins"
      const again = `After the failover ${Date.now()}`;
      const alive = config.instances.find((i) => i.name !== victim.name);
      await rest(alive.url, "POST", "/api/alerts", { message: again }, root);
      await ada.waitForSelector(`#alerts li:has-text("${again}")`, { timeout: WAIT_MS });
      const states = await ada.evaluate(() => window.blog.states.join(" > "));
      return `killed ${victim.name}; now on ${now}; states ${states}`;
    });

    await check("no_page_errors", async () => {
      const errors = [...ada.errors, ...bob.errors];
      if (errors.length) throw new Error(errors.join("\n"));
    });
  } finally {
    await browser.close();
  }
}

main().then(
  () => process.exit(failed ? 1 : 0),
  (err) => {
    process.stderr.write(`${(err && err.stack) || err}\n`);
    process.exit(2);
  },
);
