"use strict";
// hubwire's live dashboard in Debian's Chromium (headless, playwright-core, launched like
// tests/blog/browser.cjs), on a two-instance cluster of tests/apps/dashboard.py sharing Redis.
//
// The official Node client opens app connections on both instances (A: WebSockets + LongPolling,
// B: ServerSentEvents + WebSockets); the page (on A, HTTP Basic credentials given the way a person
// types them into the browser's prompt) must show both instances and those counts (its own
// connection not among them), deliveries and backplane messages per second once A broadcasts, then
// B gone after B is SIGKILLed (its lease expires). Prints one JSON line per check:
// {"name", "ok", "detail", "ms"}; screenshots go to <artifacts>/.
//
// Usage: node tests/dashboard/browser.cjs <config.json>
//   config: {chromium, artifacts, path, user, password, leaseTtl, instances: [{name, url, pid}]}

const fs = require("node:fs");
const path = require("node:path");
const { chromium } = require("playwright-core");
const signalR = require("@microsoft/signalr");

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const [A, B] = config.instances;
const CHECK_TIMEOUT_MS = 20000;
const T = signalR.HttpTransportType;

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

let skipRest = false;
async function check(name, body) {
  const started = Date.now();
  if (skipRest) {
    emit(name, false, "not run: an earlier check failed", started);
    return;
  }
  try {
    const detail = await withTimeout(Promise.resolve().then(body), CHECK_TIMEOUT_MS, name);
    emit(name, true, detail, started);
  } catch (err) {
    skipRest = true;
    emit(name, false, String((err && err.stack) || err), started);
  }
}

async function appClient(base, transport, user) {
  const connection = new signalR.HubConnectionBuilder()
    .withUrl(`${base}/hub?user=${user}`, { transport })
    .configureLogging(signalR.LogLevel.None)
    .build();
  connection.on("Message", () => {});
  await connection.start();
  return connection;
}

/** What the page shows of one instance: its row's health and total, its cells per transport. */
function pageState(page) {
  return page.evaluate(() => {
    const rows = {};
    for (const tr of document.querySelectorAll("#instances tbody tr[data-instance]")) {
      rows[tr.dataset.instance] = { health: tr.dataset.health, total: tr.dataset.total, transports: {} };
    }
    for (const tr of document.querySelectorAll("#per-hub tbody tr[data-instance]")) {
      for (const td of tr.querySelectorAll("td[data-transport]")) {
        const n = Number(td.textContent);
        if (n) rows[tr.dataset.instance].transports[`${tr.dataset.hub}/${td.dataset.transport}`] = n;
      }
    }
    const chart = document.getElementById("chart").dataset;
    return {
      status: document.body.dataset.status,
      snapshots: Number(document.body.dataset.snapshots || 0),
      rows,
      peaks: { deliveries: Number(chart.peakDeliveries || 0), published: Number(chart.peakPublished || 0) },
    };
  });
}

async function waitForState(page, predicate, ms, what) {
  const deadline = Date.now() + ms;
  let state;
  while (Date.now() < deadline) {
    state = await pageState(page);
    if (predicate(state)) return state;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}; the page shows ${JSON.stringify(state)}`);
}

(async () => {
  fs.mkdirSync(config.artifacts, { recursive: true });
  const clients = [];
  const browser = await chromium.launch({
    executablePath: config.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    timeout: 30000,
  });
  const context = await browser.newContext({
    viewport: { width: 1280, height: 860 },
    httpCredentials: { username: config.user, password: config.password },
  });
  const page = await context.newPage();
  const problems = [];
  const origins = new Set();
  page.on("pageerror", (err) => problems.push(`page error: ${err}`));
  page.on("console", (msg) => msg.type() === "error" && problems.push(`console: ${msg.text()}`));
  page.on("request", (req) => origins.add(new URL(req.url()).origin.replace(/^ws/, "http")));
  const dashboard = `${A.url}${config.path}`;
  try {
    await check("app_clients_connect", async () => {
      clients.push(await appClient(A.url, T.WebSockets, "ann"));
      clients.push(await appClient(A.url, T.LongPolling, "al"));
      clients.push(await appClient(B.url, T.ServerSentEvents, "bea"));
      clients.push(await appClient(B.url, T.WebSockets, "bo"));
    });

    await check("page_shows_both_instances", async () => {
      await page.goto(dashboard, { timeout: 15000 });
      const state = await waitForState(
        page,
        (s) => s.status === "live" && [A, B].every((i) => s.rows[i.name] && s.rows[i.name].health === "ok"),
        10000,
        "both instances, healthy",
      );
      return `${Object.keys(state.rows).length} instances after ${state.snapshots} snapshots`;
    });

    await check("connection_counts_per_instance_hub_and_transport", async () => {
      const want = {
        [A.name]: { total: "2", transports: { "DemoHub/WebSockets": 1, "DemoHub/LongPolling": 1 } },
        [B.name]: { total: "2", transports: { "DemoHub/ServerSentEvents": 1, "DemoHub/WebSockets": 1 } },
      };
      const sorted = (o) => Object.fromEntries(Object.entries(o).sort());
      const shown = (row) => JSON.stringify({ total: row.total, transports: sorted(row.transports) });
      const same = (s) => [A, B].every((i) => shown(s.rows[i.name]) === shown(want[i.name]));
      // the page's own connection (WebSockets on A) is not an app connection: A shows 2, not 3
      await waitForState(page, (s) => s.rows[A.name] && s.rows[B.name] && same(s), 5000, `counts ${JSON.stringify(want)}`);
      // it is counted apart, and it came over WebSockets: Chromium sent the Basic credentials there too
      const stats = await (await fetch(`${A.url}/debug/stats`)).json();
      if (JSON.stringify(stats.dashboard) !== JSON.stringify({ viewers: { WebSockets: 1 } })) {
        throw new Error(`A's stats show the dashboard as ${JSON.stringify(stats.dashboard)}`);
      }
      return `A: ${stats.hub_connections} hub connections, dashboard ${JSON.stringify(stats.dashboard)}`;
    });

    await check("deliveries_and_backplane_rates_charted", async () => {
      for (let i = 0; i < 10; i += 1) await clients[0].invoke("send_all", `m${i}`); // 10 x 4 deliveries
      const state = await waitForState(page, (s) => s.peaks.deliveries > 0 && s.peaks.published > 0, 6000, "a peak of deliveries and of backplane messages in the chart");
      await page.screenshot({ path: path.join(config.artifacts, "01-two-instances.png"), fullPage: true });
      return `peaks: ${JSON.stringify(state.peaks)}`;
    });

    await check("killed_instance_gone_within_lease_ttl", async () => {
      const killed = Date.now();
      process.kill(B.pid, "SIGKILL");
      await waitForState(page, (s) => !(B.name in s.rows) || s.rows[B.name].health === "no answer", config.leaseTtl * 1000 + 6000, `${B.name} not answering`);
      const silent = Date.now() - killed;
      await waitForState(page, (s) => !(B.name in s.rows) && s.rows[A.name] && s.rows[A.name].health === "ok", config.leaseTtl * 1000 + 6000, `${B.name} gone`);
      const gone = Date.now() - killed;
      await page.screenshot({ path: path.join(config.artifacts, "02-one-instance-after-sigkill.png"), fullPage: true });
      return `shown as not answering after ${silent} ms, gone from the page ${gone} ms after the SIGKILL (lease TTL ${config.leaseTtl * 1000} ms)`;
    });

    await check("everything_from_the_instance_no_page_errors", async () => {
      const others = [...origins].filter((o) => o !== A.url);
      if (others.length) throw new Error(`requests to other origins: ${others.join(", ")}`);
      if (problems.length) throw new Error(problems.join("\n"));
      return [...origins].join(", ");
    });
  } finally {
    for (const c of clients) await c.stop().catch(() => {});
    await browser.close();
  }
})().catch((err) => {
  emit("script", false, String((err && err.stack) || err), Date.now());
  process.exitCode = 1;
});
