"use strict";
// permessage-deflate in Debian's Chromium, driven by playwright-core: the official client's browser
// bundle on tests.apps.compression's /page, one run per protocol over WebSockets. The page wraps
// window.WebSocket to read what the browser negotiated (WebSocket.extensions), receives compressed
// broadcasts of ~1 KB JSON-like lists, and echoes a 2 KB string (the browser compresses what it sends;
// the server's counters show it was inflated).
// Prints one JSON line per check: {"name": "<protocol>/<check>", "ok", "detail"}.
//
// Usage: node tests/js/compression-browser.cjs <port> [chromium-path]

const { runPageChecks, exitAfter } = require("./pagechecks.cjs");

const [port, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
const BASE = `http://127.0.0.1:${port}`;

/** Runs inside the page: every check for one protocol. */
async function pageChecks({ protocol }) {
  const WAIT = 10000;
  const results = [];
  const withTimeout = (promise, what) =>
    Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), WAIT))]);
  const expectEq = (actual, expected, what) => {
    if (JSON.stringify(actual) !== JSON.stringify(expected)) {
      throw new Error(`${what}: expected ${JSON.stringify(expected).slice(0, 200)}, got ${JSON.stringify(actual).slice(0, 200)}`);
    }
  };
  const check = async (name, body) => {
    try {
      await withTimeout(body(), name);
      results.push({ name, ok: true, detail: "" });
    } catch (err) {
      results.push({ name, ok: false, detail: String((err && err.message) || err) });
    }
  };
  // what tests/apps/compression.py's items() builds
  const items = (size, seed) => {
    const out = [];
    for (let total = 0; total < size; total += 60) {
      const n = seed * 1000 + out.length;
      out.push({ id: n, user: `user${n % 13}`, text: `message number ${n}`, read: n % 2 === 0 });
    }
    return out;
  };
  const counters = async () => (await (await fetch("/debug/stats")).json()).websocket_compression;

  const sockets = [];
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  };
  const builder = new signalR.HubConnectionBuilder()
    .withUrl("/hub", { transport: signalR.HttpTransportType.WebSockets, skipNegotiation: true })
    .configureLogging(signalR.LogLevel.None);
  if (protocol === "messagepack") builder.withHubProtocol(new signalR.protocols.msgpack.MessagePackHubProtocol());
  const connection = builder.build();
  const received = [];
  let wake = null;
  connection.on("Items", (seed, list) => {
    received.push([seed, list]);
    if (wake) wake();
  });
  const before = await counters();
  await withTimeout(connection.start(), "start");
  try {
    await check("extension_negotiated", async () => {
      expectEq(sockets.length, 1, "WebSockets opened");
      const agreed = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=12";
      expectEq(sockets[0].extensions, agreed, "extensions");
    });
    await check("compressed_broadcasts_received", async () => {
      await connection.invoke("Broadcast", 3, 1000);
      while (received.length < 3) await new Promise((resolve) => { wake = resolve; });
      expectEq(received, [0, 1, 2].map((seed) => [seed, items(1000, seed)]), "Items");
    });
    await check("compressed_echo_inflated", async () => {
      const text = "caf\u00e9 " + "0123456789abcdef".repeat(128);
      expectEq(await connection.invoke("Echo", text), text, "Echo");
      expectEq(await connection.invoke("Length", text), text.length, "Length");
    });
    await check("server_counters", async () => {
      const after = await counters();
      const delta = Object.fromEntries(Object.keys(after).map((k) => [k, after[k] - before[k]]));
      if (delta.negotiated !== 1) throw new Error(`negotiated: ${JSON.stringify(delta)}`);
      // 3 broadcasts and the echo's 2 KB completion went out compressed
      if (delta.compressions < 4 || delta.frames < 4) throw new Error(`compressed: ${JSON.stringify(delta)}`);
      // the handshake and three invocations came in compressed
      if (delta.inflated < 4) throw new Error(`inflated: ${JSON.stringify(delta)}`);
    });
  } finally {
    await connection.stop();
  }
  return results;
}

exitAfter(() =>
  runPageChecks(
    executablePath,
    ["json", "messagepack"].map((protocol) => ({ prefix: protocol, url: `${BASE}/page`, args: { protocol } })),
    pageChecks,
  ),
);
