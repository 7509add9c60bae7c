"use strict";
// The official @microsoft/signalr client (Node) against the interop app: the behaviours that are
// checked once rather than per transport x protocol (redirects, skipNegotiation, transport
// fallback, long-polling stop, raw echo connections, negotiate errors, long-polling idling).
// Prints one JSON line per check: {"name", "ok", "detail", "ms"}.
//
// Usage: node tests/interop/once-checks.cjs <base-url> [check-name ...]
// Env: INTEROP_LONG_POLL_TIMEOUT (seconds; the server's, for the idle check)

const WebSocket = require("ws");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");
const { HttpConnection } = require("@microsoft/signalr/dist/cjs/HttpConnection");
const {
  RecordingHttpClient,
  WAIT_MS,
  deferred,
  eq,
  ok,
  rejectionOf,
  runChecks,
  sleep,
  stderrLogger,
  withTimeout,
} = require("./common.cjs");

const [baseUrl, ...only] = process.argv.slice(2);
const logger = stderrLogger("once");
const T = signalR.HttpTransportType;
const pollTimeoutSeconds = Number(process.env.INTEROP_LONG_POLL_TIMEOUT || "90");

async function started(ctx, connection) {
  ctx.cleanup(() => connection.stop());
  await withTimeout(connection.start(), WAIT_MS, "start");
  return connection;
}

function hub(url, options = {}, protocol = null) {
  const b = new signalR.HubConnectionBuilder().withUrl(url, options).configureLogging(logger);
  if (protocol) b.withHubProtocol(protocol);
  return b;
}

async function rawEcho(ctx, transport) {
  const connection = new HttpConnection(`${baseUrl}/echo`, { transport, logger });
  const received = deferred();
  const closed = deferred();
  connection.onreceive = (data) => received.resolve(data);
  connection.onclose = (err) => closed.resolve(err);
  ctx.cleanup(() => connection.stop());
  await withTimeout(connection.start(signalR.TransferFormat.Text), WAIT_MS, "start");
  await connection.send("Hello World!");
  eq(await withTimeout(received.promise, WAIT_MS, "echo"), "Hello World!", "echo");
  await connection.stop();
  eq(await withTimeout(closed.promise, WAIT_MS, "onclose"), undefined, "close error");
}

const checks = [
  ["redirect_negotiate_then_reconnect", async (ctx) => {
    const url = `${baseUrl}/redirect?baseUrl=${encodeURIComponent(baseUrl)}`;
    const c = await started(ctx, hub(url).withAutomaticReconnect().build());
    const firstRedirects = await c.invoke("GetNumRedirects");
    ok(firstRedirects > 0, `GetNumRedirects > 0 (${firstRedirects})`);
    eq(await c.invoke("GetCallerConnectionId"), c.connectionId, "connection id after redirect");
    const reconnected = deferred();
    c.onreconnected((id) => reconnected.resolve(id));
    c.serverTimeout();
    await withTimeout(reconnected.promise, WAIT_MS, "onreconnected");
    const secondRedirects = await c.invoke("GetNumRedirects");
    ok(secondRedirects > firstRedirects, `redirected again on reconnect (${firstRedirects} -> ${secondRedirects})`);
  }],
  ["skip_negotiation_websockets", async (ctx) => {
    const c = await started(ctx, hub(`${baseUrl}/testhub`, { skipNegotiation: true, transport: T.WebSockets }).build());
    eq(c.connectionId, null, "client connectionId without negotiate");
    eq(await c.invoke("Echo", "no negotiate"), "no negotiate", "Echo");
    ok(typeof (await c.invoke("GetCallerConnectionId")) === "string", "server-side id exists");
  }],
  ["skip_negotiation_reconnects", async (ctx) => {
    const options = { skipNegotiation: true, transport: T.WebSockets };
    const c = await started(ctx, hub(`${baseUrl}/testhub`, options).withAutomaticReconnect().build());
    const first = await c.invoke("GetCallerConnectionId");
    const reconnected = deferred();
    c.onreconnected(() => reconnected.resolve());
    c.serverTimeout();
    await withTimeout(reconnected.promise, WAIT_MS, "onreconnected");
    const second = await c.invoke("GetCallerConnectionId");
    ok(second !== first, `new server-side connection (${first} -> ${second})`);
  }],
  ["nowebsockets_json_falls_back_to_sse", async (ctx) => {
    const c = await started(ctx, hub(`${baseUrl}/testhub-nowebsockets`).build());
    eq(await c.invoke("GetActiveTransportName"), "ServerSentEvents", "transport");
  }],
  ["nowebsockets_messagepack_falls_back_to_longpolling", async (ctx) => {
    const c = await started(ctx, hub(`${baseUrl}/testhub-nowebsockets`, {}, new MessagePackHubProtocol()).build());
    eq(await c.invoke("GetActiveTransportName"), "LongPolling", "transport");
  }],
  ["nowebsockets_refuses_websockets_only_client", async () => {
    const c = hub(`${baseUrl}/testhub-nowebsockets`, { transport: T.WebSockets }).build();
    const message = await rejectionOf(c.start(), "start");
    ok(message.includes("Unable to connect to the server with any of the available transports."), `refused: ${message}`);
  }],
  ["longpolling_stop_sends_delete_and_poll_ends", async (ctx) => {
    const http = new RecordingHttpClient(logger);
    const c = await started(ctx, hub(`${baseUrl}/testhub`, { transport: T.LongPolling, httpClient: http }).build());
    eq(await c.invoke("Echo", "x"), "x", "Echo");
    const closed = deferred();
    c.onclose((err) => closed.resolve(err));
    await c.stop();
    eq(await withTimeout(closed.promise, WAIT_MS, "onclose"), undefined, "close error");
    const deletes = http.requests.filter((r) => r.method === "DELETE");
    eq(deletes.map((r) => r.status), [202], "DELETE statuses");
    // the client does not wait for its Close-message POST; give in-flight requests a bounded moment
    for (let i = 0; i < 40 && http.requests.some((r) => r.status === null); i++) await sleep(50);
    eq(http.requests.filter((r) => r.status === null), [], "no request still in flight after stop");
    const polls = http.requests.filter((r) => r.method === "GET");
    eq(polls[0].status, 200, "first poll answered 200");
  }],
  ["longpolling_survives_idle_longer_than_poll_timeout", async (ctx) => {
    const http = new RecordingHttpClient(logger);
    const c = await started(ctx, hub(`${baseUrl}/testhub`, { transport: T.LongPolling, httpClient: http }).build());
    const closed = deferred();
    c.onclose((err) => closed.resolve(err));
    const idleMs = pollTimeoutSeconds * 1000 * 2 + 500;
    ok(idleMs < 15000, `server poll timeout short enough for this check (${pollTimeoutSeconds} s)`);
    const outcome = await Promise.race([sleep(idleMs).then(() => "idle"), closed.promise.then((e) => `closed: ${e}`)]);
    eq(outcome, "idle", "connection stayed up while idle");
    const emptyPolls = http.requests.filter((r) => r.method === "GET" && r.status === 200).length;
    ok(emptyPolls >= 3, `server ended idle polls with 200 and the client re-polled (${emptyPolls} polls)`);
    eq(await c.invoke("Echo", "after idle"), "after idle", "Echo after idling");
  }],
  ["raw_echo_websockets", (ctx) => rawEcho(ctx, T.WebSockets)],
  ["raw_echo_server_sent_events", (ctx) => rawEcho(ctx, T.ServerSentEvents)],
  ["raw_echo_long_polling", (ctx) => rawEcho(ctx, T.LongPolling)],
  ["raw_websocket_echo_without_negotiate", async (ctx) => {
    const ws = new WebSocket(`${baseUrl.replace(/^http/, "ws")}/echo`);
    ctx.cleanup(() => ws.terminate());
    const opened = deferred();
    const message = deferred();
    const closed = deferred();
    ws.on("open", opened.resolve);
    ws.on("error", opened.reject);
    // ws 7 hands text frames over as strings and binary frames as Buffers
    ws.on("message", (data) => message.resolve({ text: data.toString(), textFrame: typeof data === "string" }));
    ws.on("close", (code) => closed.resolve(code));
    await withTimeout(opened.promise, WAIT_MS, "open");
    ws.send("message");
    eq(await withTimeout(message.promise, WAIT_MS, "echo"), { text: "message", textFrame: true }, "echo frame");
    ws.close(1000);
    eq(await withTimeout(closed.promise, WAIT_MS, "close"), 1000, "close code");
  }],
  ["bad_negotiate_error_text", async () => {
    const c = hub(`${baseUrl}/bad-negotiate`).build();
    eq(
      await rejectionOf(c.start(), "start"),
      "Failed to complete negotiation with the server: Error: Some response from server: Status code '400'",
      "start error",
    );
  }],
  ["route_and_method_case_insensitive", async (ctx) => {
    const c = await started(ctx, hub(`${baseUrl}/TESTHUB/`).build());
    eq(await c.invoke("eChO", "cased"), "cased", "Echo through /TESTHUB/");
  }],
];

runChecks(checks, only).then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`${err && err.stack}\n`);
    process.exit(2);
  },
);
