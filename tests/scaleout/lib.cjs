"use strict";
// Shared helpers of the multi-instance (Redis backplane) scenarios run by tests/test_scaleout.py.
//
// Output protocol, one JSON object per stdout line:
//   {"name": "...", "ok": true|false, "detail": "...", "ms": N}   a check's result
//   {"event": "...", ...data}                                        a step: the test acts (kills Redis,
//                                                                     reads PUBSUB, ...) then writes one
//                                                                     line to our stdin to resume us
// Every wait is bounded; a check that exceeds its bound fails with what was (not) received.

const http = require("node:http");
const net = require("node:net");
const util = require("node:util");
const readline = require("node:readline");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const WAIT_MS = 8000; // bounded wait for expected deliveries
const QUIET_MS = 300; // after the barrier: how long we watch for duplicates / strays
const CHECK_TIMEOUT_MS = 25000; // hard bound per check
const STEP_TIMEOUT_MS = 30000; // hard bound for the test to answer a step

class CheckFailed extends Error {}

function show(value) {
  return util.inspect(value, { depth: 6, breakLength: Infinity });
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function eq(actual, expected, what) {
  if (!util.isDeepStrictEqual(actual, expected)) {
    throw new CheckFailed(`${what}: expected ${show(expected)}, got ${show(actual)}`);
  }
}

function ensure(condition, what) {
  if (!condition) throw new CheckFailed(what);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new CheckFailed(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `predicate` every 10 ms; throws (with `describe()`'s state) after `ms`. */
async function waitFor(predicate, ms, what, describe) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) {
      throw new CheckFailed(`timed out after ${ms} ms waiting for ${what}${describe ? ": " + describe() : ""}`);
    }
    await sleep(10);
  }
}

let uniqueCounter = 0;
/** A value no other check uses, so stray deliveries cannot be mistaken for expected ones. */
function unique(label) {
  uniqueCounter += 1;
  return `${label}-${uniqueCounter}-${Math.random().toString(36).slice(2, 8)}`;
}

/**
 * Starts the official client over WebSockets. Every "Message"(kind, value) it receives is
 * recorded as "kind:value" in `client.got`; its "Result" handler answers `result` (default
 * "result-<tag>").
 */
async function connect(
  baseUrl,
  { tag, user, protocol = "json", result, hub = "/hub", transport = signalR.HttpTransportType.WebSockets } = {},
) {
  const url = `${baseUrl}${hub}` + (user ? `?user=${encodeURIComponent(user)}` : "");
  const builder = new signalR.HubConnectionBuilder()
    .withUrl(url, { transport })
    .configureLogging(signalR.LogLevel.None);
  if (protocol === "messagepack") builder.withHubProtocol(new MessagePackHubProtocol());
  const conn = builder.build();
  const client = { conn, tag, user, protocol, base: baseUrl, got: [], id: null, closed: false };
  conn.on("Message", (kind, value) => {
    client.got.push(`${kind}:${value}`);
  });
  conn.on("Result", typeof result === "function" ? result : () => (result === undefined ? `result-${tag}` : result));
  conn.onclose(() => {
    client.closed = true;
  });
  await withTimeout(conn.start(), WAIT_MS, `connect ${tag} to ${url}`);
  client.id = conn.connectionId;
  return client;
}

function count(client, message) {
  return client.got.filter((m) => m === message).length;
}

function counts(clients, message) {
  return Object.fromEntries(clients.map((c) => [c.tag, count(c, message)]));
}

/**
 * The delivery barrier: waits (bounded) until each of `expected` got `message`, then QUIET_MS
 * more, and checks that exactly the expected clients got it, once each.
 */
async function expectExactlyOnce(clients, expected, message, what = message) {
  const want = Object.fromEntries(clients.map((c) => [c.tag, expected.includes(c) ? 1 : 0]));
  await waitFor(
    () => expected.every((c) => count(c, message) >= 1),
    WAIT_MS,
    `${what} at ${show(expected.map((c) => c.tag))}`,
    () => `counts ${show(counts(clients, message))}`,
  );
  await sleep(QUIET_MS);
  eq(counts(clients, message), want, `deliveries of ${what}`);
  return `delivered once to ${expected.map((c) => c.tag).join(",") || "nobody"}`;
}

async function invoke(client, method, ...args) {
  return withTimeout(client.conn.invoke(method, ...args), WAIT_MS + 5000, `${client.tag}.invoke(${method})`);
}

async function post(url) {
  const response = await withTimeout(fetch(url, { method: "POST" }), WAIT_MS, `POST ${url}`);
  if (!response.ok) throw new CheckFailed(`POST ${url}: HTTP ${response.status} ${await response.text()}`);
  return response.json();
}

async function getJson(url) {
  const response = await withTimeout(fetch(url), WAIT_MS, `GET ${url}`);
  if (!response.ok) throw new CheckFailed(`GET ${url}: HTTP ${response.status}`);
  return response.json();
}

const results = { failed: 0 };

/** Runs one named check; its outcome is one output line. Never throws. */
async function check(name, fn, timeoutMs = CHECK_TIMEOUT_MS) {
  const start = Date.now();
  try {
    const detail = await withTimeout(Promise.resolve().then(fn), timeoutMs, name);
    emit({ name, ok: true, detail: detail === undefined ? "" : String(detail), ms: Date.now() - start });
    return true;
  } catch (err) {
    results.failed += 1;
    const detail = err instanceof CheckFailed ? err.message : (err && err.stack) || String(err);
    emit({ name, ok: false, detail, ms: Date.now() - start });
    return false;
  }
}

// -- steps: the test acts on our behalf, then answers one stdin line ----------------------------

let stdinLines = null;
const lineWaiters = [];

function nextLine() {
  if (stdinLines === null) {
    stdinLines = [];
    const rl = readline.createInterface({ input: process.stdin });
    rl.on("line", (line) => {
      const waiter = lineWaiters.shift();
      if (waiter) waiter(line);
      else stdinLines.push(line);
    });
  }
  if (stdinLines.length) return Promise.resolve(stdinLines.shift());
  return new Promise((resolve) => lineWaiters.push(resolve));
}

/** Emits {"event": name, ...data}, waits for the test's answer (a JSON line), returns it parsed. */
async function step(event, data = {}) {
  emit({ event, ...data });
  const line = await withTimeout(nextLine(), STEP_TIMEOUT_MS, `the test's answer to step ${event}`);
  return line ? JSON.parse(line) : {};
}

/** Stops every client; a stop that fails or hangs is an error of the scenario (never swallowed). */
async function stopAll(clients) {
  const outcomes = await Promise.allSettled(clients.map((c) => withTimeout(c.conn.stop(), WAIT_MS, `stop ${c.tag}`)));
  const failed = outcomes
    .map((o, i) => (o.status === "rejected" ? `${clients[i].tag}: ${o.reason && o.reason.message}` : null))
    .filter((e) => e !== null);
  if (failed.length) throw new Error(`stopping clients failed: ${failed.join("; ")}`);
}

/** Runs `main`; a crash is reported as the check "scenario_crashed". Exits the process. */
function run(main) {
  main()
    .catch((err) => {
      emit({ name: "scenario_crashed", ok: false, detail: (err && err.stack) || String(err) });
    })
    .finally(() => process.exit(0));
}

// A round-robin proxy (loopback, ephemeral port): each HTTP request and each WebSocket upgrade goes to
// the next backend in turn, with no affinity; `log` records where each went.
function startProxy(backends) {
  const log = [];
  let next = 0;
  const pick = () => {
    const index = next++ % backends.length;
    return { index, backend: backends[index] };
  };
  const server = http.createServer((req, res) => {
    const { index, backend } = pick();
    log.push({ kind: "http", method: req.method, path: req.url, backend: index });
    const upstream = http.request(
      { host: backend.hostname, port: backend.port, method: req.method, path: req.url, headers: req.headers },
      (up) => {
        res.writeHead(up.statusCode, up.headers);
        up.pipe(res);
      },
    );
    upstream.on("error", () => {
      if (!res.headersSent) res.writeHead(502);
      res.end();
    });
    res.on("close", () => upstream.destroy()); // a client that goes away ends the upstream request too
    req.pipe(upstream);
  });
  server.on("upgrade", (req, socket, head) => {
    const { index, backend } = pick();
    log.push({ kind: "websocket", path: req.url, backend: index });
    const upstream = net.connect(Number(backend.port), backend.hostname, () => {
      const lines = [`${req.method} ${req.url} HTTP/${req.httpVersion}`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      upstream.write(lines.join("\r\n") + "\r\n\r\n");
      if (head && head.length) upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    const drop = () => {
      upstream.destroy();
      socket.destroy();
    };
    upstream.on("error", drop);
    socket.on("error", drop);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => resolve({ server, log, url: `http://127.0.0.1:${server.address().port}` }));
  });
}

module.exports = {
  CheckFailed,
  QUIET_MS,
  WAIT_MS,
  check,
  connect,
  count,
  counts,
  emit,
  ensure,
  eq,
  expectExactlyOnce,
  getJson,
  invoke,
  post,
  run,
  show,
  signalR,
  startProxy,
  sleep,
  step,
  stopAll,
  unique,
  waitFor,
  withTimeout,
};
