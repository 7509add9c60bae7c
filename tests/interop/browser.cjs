"use strict";
// The official client's BROWSER bundle (served by the interop app from node_modules) in Debian's
// Chromium, driven by playwright-core: one page per transport. The page is loaded from
// http://localhost:<port> while the hubs are addressed as http://127.0.0.1:<port>, so every
// request is cross-origin with credentials (CORS preflights, EventSource withCredentials,
// access_token in the query for WebSockets/SSE) exactly as in the upstream browser runs.
// Prints one JSON line per check: {"name": "<transport>/<protocol>/<check>", "ok", "detail", "ms"}.
//
// Usage: node tests/interop/browser.cjs <port> [chromium-path]

const { runPageChecks, exitAfter } = require("../js/pagechecks.cjs");

const [port, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
const PAGE_URL = `http://localhost:${port}/browser`;
const HUB_BASE = `http://127.0.0.1:${port}`;

const RUNS = [
  { transport: "WebSockets", protocol: "json" },
  { transport: "WebSockets", protocol: "messagepack" },
  { transport: "ServerSentEvents", protocol: "json" },
  { transport: "LongPolling", protocol: "json" },
  { transport: "LongPolling", protocol: "messagepack" },
];

/** Runs inside the page (serialized by playwright): every check for one transport x protocol. */
async function pageChecks({ hubBase, transport, protocol }) {
  const WAIT = 8000;
  const results = [];
  const T = signalR.HttpTransportType;
  const withTimeout = (promise, what) =>
    Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), WAIT))]);
  const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
  const expectEq = (actual, expected, what) => {
    if (!same(actual, expected)) throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  };
  const build = (path, options = {}, proto = protocol) => {
    const b = new signalR.HubConnectionBuilder()
      .withUrl(`${hubBase}${path}`, { transport: T[transport], ...options })
      .configureLogging(signalR.LogLevel.None);
    if (proto === "messagepack") b.withHubProtocol(new signalR.protocols.msgpack.MessagePackHubProtocol());
    return b.build();
  };
  const check = async (name, body) => {
    const started = Date.now();
    const connections = [];
    const open = async (path, options) => {
      const c = build(path, options);
      connections.push(c);
      await withTimeout(c.start(), `start ${path}`);
      return c;
    };
    try {
      await withTimeout(body(open), name);
      results.push({ name, ok: true, detail: "" });
    } catch (err) {
      results.push({ name, ok: false, detail: String((err && err.message) || err) });
    }
    const result = results[results.length - 1];
    for (const c of connections) {
      try {
        await withTimeout(c.stop(), "stop");
      } catch (err) {
        // a connection that cannot be stopped fails the check (it is never swallowed)
        result.detail = `${result.ok ? "" : `${result.detail}; `}stop failed: ${String((err && err.message) || err)}`;
        result.ok = false;
      }
    }
    result.ms = Date.now() - started;
  };

  await check("cross_origin_page", async () => {
    if (location.origin === new URL(hubBase).origin) throw new Error("page and hub share an origin");
  });
  await check("echo", async (open) => {
    const c = await open("/testhub");
    expectEq(await c.invoke("Echo", "hello 世界"), "hello 世界", "Echo");
  });
  await check("active_transport_name", async (open) => {
    const c = await open("/testhub");
    expectEq(await c.invoke("GetActiveTransportName"), transport, "transport");
  });
  await check("connection_id_matches_server", async (open) => {
    const c = await open("/testhub");
    expectEq(await c.invoke("GetCallerConnectionId"), c.connectionId, "connection id");
  });
  await check("server_calls_client", async (open) => {
    const c = await open("/testhub");
    const got = new Promise((resolve) => c.on("message", resolve));
    await c.invoke("InvokeWithString", "from the hub");
    expectEq(await withTimeout(got, "Message"), "from the hub", "Message");
  });
  await check("stream_items", async (open) => {
    const c = await open("/testhub");
    const items = [];
    await withTimeout(new Promise((resolve, reject) => {
      c.stream("Stream").subscribe({ next: (i) => items.push(i), error: reject, complete: resolve });
    }), "stream");
    expectEq(items, ["a", "b", "c"], "items");
  });
  await check("error_text", async (open) => {
    const c = await open("/testhub");
    let message = null;
    try { await c.invoke("ThrowException", "An error occurred."); } catch (err) { message = err.message; }
    expectEq(message, "An unexpected error occurred invoking 'ThrowException' on the server. InvalidOperationException: An error occurred.", "error");
  });
  await check("client_result", async (open) => {
    const c = await open("/testhub");
    c.on("Result", () => 10);
    expectEq(await (await fetch(`/clientresult/${c.connectionId}`)).text(), "10", "client result");
  });
  await check("user_agent_header", async (open) => {
    // browsers cannot put headers on WebSocket / EventSource requests; XHR polls carry it
    const c = await open("/testhub");
    const value = await c.invoke("GetHeader", "X-SignalR-User-Agent");
    if (transport === "LongPolling") {
      if (!value || !value.startsWith("Microsoft SignalR/")) throw new Error(`X-SignalR-User-Agent: ${value}`);
    } else {
      expectEq(value, null, "X-SignalR-User-Agent");
    }
  });
  await check("jwt_authorized_hub", async (open) => {
    const token = await (await fetch("/generateJwtToken")).text();
    const c = await open("/authorizedhub", { accessTokenFactory: () => token });
    expectEq(await c.invoke("Echo", "authorized"), "authorized", "Echo");
  });
  await check("unauthorized_negotiate_401", async () => {
    const c = build("/authorizedhub");
    let message = null;
    try { await withTimeout(c.start(), "start"); } catch (err) { message = err.message; }
    expectEq(message, "Failed to complete negotiation with the server: Error: Unauthorized: Status code '401'", "start error");
  });
  await check("nowebsockets_fallback", async () => {
    const b = new signalR.HubConnectionBuilder().withUrl(`${hubBase}/testhub-nowebsockets`).configureLogging(signalR.LogLevel.None);
    if (protocol === "messagepack") b.withHubProtocol(new signalR.protocols.msgpack.MessagePackHubProtocol());
    const c = b.build();
    try {
      await withTimeout(c.start(), "start");
      const expected = protocol === "messagepack" ? "LongPolling" : "ServerSentEvents";
      expectEq(await c.invoke("GetActiveTransportName"), expected, "fallback transport");
    } finally {
      await c.stop();
    }
  });
  // the raw /echo connection has no hub protocol: once per transport (with the json runs).
  // The browser bundle does not export HttpConnection; a HubConnection's inner one is the same class.
  if (protocol === "json") await check("raw_echo_connection", async () => {
    const received = new Promise((resolve) => { globalThis.__echo = resolve; });
    const connection = new signalR.HubConnectionBuilder().withUrl(`${hubBase}/echo`, { transport: T[transport] }).build().connection;
    connection.onreceive = (data) => globalThis.__echo(data);
    await withTimeout(connection.start(signalR.TransferFormat.Text), "start");
    try {
      await connection.send("Hello World!");
      expectEq(await withTimeout(received, "echo"), "Hello World!", "echo");
    } finally {
      await connection.stop();
    }
  });
  return results;
}

exitAfter(() =>
  runPageChecks(
    executablePath,
    RUNS.map((run) => ({
      prefix: `${run.transport}/${run.protocol}`,
      url: PAGE_URL,
      args: { hubBase: HUB_BASE, ...run },
    })),
    pageChecks,
  ),
);
