"use strict";
// Acceptance scenario: drives the official SignalR JS client against a running hubwire server
// (tests/apps/foundation.py) over WebSockets and prints one JSON line per named check:
//   {"name": "...", "ok": true|false, "detail": "..."}
//
// Usage: node tests/js/scenario.cjs <server-url> <json|messagepack> [check-name ...]
// With check names, only those checks run. `--list` prints the check names, one per line.

const util = require("node:util");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const WAIT_MS = 5000; // bounded wait for an expected message
const QUIET_MS = 300; // how long "not received" checks wait after their barrier
const CHECK_TIMEOUT_MS = 20000; // hard bound per check

const [baseUrl, protocolName, ...only] = process.argv.slice(2);

// -- helpers ---------------------------------------------------------------------------------------

class CheckFailed extends Error {}

function show(value) {
  return util.inspect(value, { depth: 6, breakLength: Infinity });
}

function eq(actual, expected, what) {
  if (!util.isDeepStrictEqual(actual, expected)) {
    throw new CheckFailed(`${what}: expected ${show(expected)}, got ${show(actual)}`);
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new CheckFailed(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Awaits a promise that must reject; returns the rejection's message. */
async function rejectionOf(promise, what) {
  let value;
  try {
    value = await withTimeout(promise, WAIT_MS, what);
  } catch (err) {
    if (err instanceof CheckFailed) throw err;
    return err && err.message;
  }
  throw new CheckFailed(`${what}: expected an error, got result ${show(value)}`);
}

let tokenCounter = 0;
function token(label) {
  tokenCounter += 1;
  return `${protocolName}-${label}-${tokenCounter}-${Math.random().toString(36).slice(2, 8)}`;
}

const stderrLogger = {
  log(level, message) {
    if (level >= signalR.LogLevel.Warning) {
      process.stderr.write(`[${protocolName}] ${signalR.LogLevel[level]}: ${message}\n`);
    }
  },
};

/** A started hub connection plus an inbox of the client-method calls it received. */
class Client {
  constructor(connection) {
    this.connection = connection;
    this.inbox = []; // {method, args}
    this.waiters = new Set();
    // every hub message the client parsed, in order (pings included), whether a handler took it or not
    this.received = [];
    const protocol = connection._protocol;
    const parse = protocol.parseMessages.bind(protocol);
    protocol.parseMessages = (data, logger) => {
      const messages = parse(data, logger);
      this.received.push(...messages);
      return messages;
    };
  }

  get id() {
    return this.connection.connectionId;
  }

  record(method, args) {
    this.inbox.push({ method, args });
    for (const waiter of [...this.waiters]) waiter();
  }

  /** Registers a handler that records calls (no return value: not a client-result handler). */
  listen(method) {
    this.connection.on(method, (...args) => {
      this.record(method, args);
    });
  }

  matching(method, args) {
    return this.inbox.filter((m) => m.method === method && util.isDeepStrictEqual(m.args, args));
  }

  /** Waits (bounded) until a call of `method` with exactly `args` has been received. */
  async expect(method, args, what) {
    const found = () => this.matching(method, args).length > 0;
    if (found()) return;
    let waiter;
    const arrived = new Promise((resolve) => {
      waiter = () => {
        if (found()) resolve();
      };
      this.waiters.add(waiter);
    });
    try {
      await withTimeout(
        arrived,
        WAIT_MS,
        `${what}: ${method}${show(args)} not received (inbox ${show(this.inbox)})`,
      );
    } finally {
      this.waiters.delete(waiter);
    }
  }

  /**
   * Asserts `method(args)` never arrives: first a barrier message the server sends to this
   * connection after the action (so anything sent before it would already be here), then a
   * short quiet period.
   */
  async expectNone(method, args, what) {
    const mark = token("barrier");
    await this.connection.invoke("SendToCaller", "Barrier", mark);
    await this.expect("Barrier", [mark], `${what} (barrier)`);
    await sleep(QUIET_MS);
    const got = this.matching(method, args);
    if (got.length > 0) {
      throw new CheckFailed(`${what}: unexpectedly received ${method}${show(args)}`);
    }
  }

  async stop() {
    await this.connection.stop();
  }
}

function hubUrl(path, user) {
  const url = new URL(path, baseUrl);
  if (user) url.searchParams.set("user", user);
  return url.toString();
}

function buildConnection(path, user) {
  const builder = new signalR.HubConnectionBuilder()
    .withUrl(hubUrl(path, user), { transport: signalR.HttpTransportType.WebSockets })
    .configureLogging(stderrLogger);
  if (protocolName === "messagepack") {
    builder.withHubProtocol(new MessagePackHubProtocol());
  } else if (protocolName !== "json") {
    throw new Error(`unknown protocol ${protocolName}`);
  }
  return builder.build();
}

/** Starts a client; `setup(connection)` may register handlers before start. */
async function connect({ path = "/hub", user = null, listen = ["Message", "Notify", "Barrier"], setup } = {}) {
  const connection = buildConnection(path, user);
  const client = new Client(connection);
  for (const method of listen) client.listen(method);
  if (setup) setup(connection);
  await withTimeout(connection.start(), WAIT_MS, `start ${path}`);
  eq(connection.state, signalR.HubConnectionState.Connected, "connection state after start");
  const expectedProtocol = protocolName;
  eq(connection._protocol.name, expectedProtocol, "hub protocol in use");
  eq(
    connection.connection.transport && connection.connection.transport.constructor.name,
    "WebSocketTransport",
    "transport in use",
  );
  return client;
}

/** Collects a server stream: resolves {items, error} (error = message or null). */
function collectStream(connection, method, ...args) {
  return new Promise((resolve) => {
    const items = [];
    connection.stream(method, ...args).subscribe({
      next: (item) => items.push(item),
      complete: () => resolve({ items, error: null }),
      error: (err) => resolve({ items, error: err && err.message }),
    });
  });
}

async function assertAlive(client, what) {
  eq(client.connection.state, signalR.HubConnectionState.Connected, `${what}: connection state`);
  const word = token("alive");
  eq(await client.connection.invoke("Echo", word), word, `${what}: echo afterwards`);
}

// -- checks ----------------------------------------------------------------------------------------

const checks = [];
function check(name, body) {
  checks.push({ name, body });
}

/** Runs `body(clients...)` with `n` connected clients (options per client), always stopping them. */
async function withClients(options, body) {
  const clients = [];
  let result;
  let failure = null;
  try {
    for (const opt of options) clients.push(await connect(opt));
    result = await body(...clients);
  } catch (err) {
    failure = err;
  }
  const stops = await Promise.allSettled(clients.map((c) => c.stop()));
  if (failure !== null) throw failure;
  // a client that cannot be stopped fails the check (it is never swallowed)
  const failed = stops.filter((s) => s.status === "rejected").map((s) => String(s.reason && s.reason.message));
  if (failed.length) throw new CheckFailed(`stopping clients failed: ${failed.join("; ")}`);
  return result;
}

// invoke with results

check("invoke_echo_ascii", async () =>
  withClients([{}], async (a) => {
    eq(await a.connection.invoke("Echo", "hello world"), "hello world", "Echo result");
    eq(await a.connection.invoke("Echo", ""), "", "Echo of empty string");
  }));

check("invoke_echo_non_ascii", async () =>
  withClients([{}], async (a) => {
    for (const text of ["漢字テスト 中文 한국어", "héllo wörld ✓ ñ", "emoji 😀🎉 𝄞", "Ελληνικά русский"]) {
      eq(await a.connection.invoke("Echo", text), text, `Echo of ${show(text)}`);
    }
  }));

check("invoke_echo_control_chars", async () =>
  withClients([{}], async (a) => {
    const text = 'rs\u001eus\u001f nul\u0000 "quoted" back\\slash\nnew\ttab';
    eq(await a.connection.invoke("Echo", text), text, "Echo of control/escape characters");
  }));

check("invoke_add_ints", async () =>
  withClients([{}], async (a) => {
    eq(await a.connection.invoke("Add", 2, 3), 5, "Add(2, 3)");
    eq(await a.connection.invoke("Add", -7, 4), -3, "Add(-7, 4)");
    eq(await a.connection.invoke("Add", 0, 0), 0, "Add(0, 0)");
    eq(await a.connection.invoke("Add", 2 ** 40, 1), 2 ** 40 + 1, "Add(2**40, 1)");
  }));

check("invoke_structured_object", async () =>
  withClients([{}], async (a) => {
    const result = await a.connection.invoke("AddPoints", { x: 1, y: 2 }, { x: 3, y: -4 });
    eq(result, { x: 4, y: -2 }, "AddPoints result");
  }));

check("invoke_void_returns_null", async () =>
  withClients([{}], async (a) => {
    eq(await a.connection.invoke("Nothing"), null, "Nothing() result");
  }));

check("invoke_method_name_case_insensitive", async () =>
  withClients([{}], async (a) => {
    eq(await a.connection.invoke("echo", "lower"), "lower", "invoke('echo')");
    eq(await a.connection.invoke("ECHO", "upper"), "upper", "invoke('ECHO')");
    eq(await a.connection.invoke("get_connection_id"), a.id, "snake_case name also accepted");
  }));

check("invoke_connection_id_matches_client", async () =>
  withClients([{}], async (a) => {
    eq(typeof a.id, "string", "client connectionId type");
    eq(await a.connection.invoke("GetConnectionId"), a.id, "GetConnectionId()");
  }));

check("invoke_user_from_query", async () =>
  withClients([{ user: "alice" }, {}], async (alice, anon) => {
    eq(await alice.connection.invoke("GetUser"), "alice", "GetUser() with ?user=alice");
    eq(await anon.connection.invoke("GetUser"), null, "GetUser() without user");
  }));

check("invoke_concurrent_results_match_ids", async () =>
  withClients([{}], async (a) => {
    const words = Array.from({ length: 25 }, (_, i) => `w${i}-漢`);
    const results = await withTimeout(
      Promise.all(words.map((w) => a.connection.invoke("Echo", w))),
      WAIT_MS,
      "25 concurrent invocations",
    );
    eq(results, words, "concurrent Echo results");
  }));

// send (fire-and-forget) and server-to-client calls

check("send_fire_and_forget", async () =>
  withClients([{}], async (a) => {
    const value = token("send");
    eq(await a.connection.send("SendToCaller", "Notify", value), undefined, "send() resolves to");
    await a.expect("Notify", [value], "client method called by the sent hub method");
  }));

check("send_unknown_method_is_silent", async () =>
  withClients([{}], async (a) => {
    const mark = a.received.length;
    await a.connection.send("NoSuchMethod", 1, 2);
    await a.connection.send("Add", 1); // wrong argument count, no invocation id: no answer either
    // the barrier: the server handles one connection's messages in order, so anything it sent for the
    // two calls above arrived before the completion of this later invocation
    await assertAlive(a, "after fire-and-forget calls that fail on the server");
    const after = a.received.slice(mark).filter((m) => m.type !== signalR.MessageType.Ping);
    eq(after.map((m) => m.type), [signalR.MessageType.Completion], "messages received since the two sends");
    eq(after[0].error, undefined, "the barrier's completion carries no error");
  }));

check("server_to_client_call_before_completion", async () =>
  withClients([{}], async (a) => {
    const value = token("notify") + " ✓ 漢字";
    await a.connection.invoke("SendToCaller", "Notify", value);
    // written before the invocation's completion on the same connection: already delivered
    eq(a.matching("Notify", [value]).length, 1, "Notify calls received when invoke resolved");
  }));

check("server_to_client_handler_name_case_insensitive", async () =>
  withClients([{ listen: ["Message", "Barrier", "mixedCaseHandler"] }], async (a) => {
    const value = token("case");
    await a.connection.invoke("SendToCaller", "MIXEDCASEHANDLER", value);
    await a.expect("mixedCaseHandler", [value], "handler registered with another casing");
  }));

// server-to-client streams

check("stream_items_in_order", async () =>
  withClients([{}], async (a) => {
    const result = await withTimeout(collectStream(a.connection, "Counter", 5, 5), WAIT_MS, "Counter stream");
    eq(result, { items: [0, 1, 2, 3, 4], error: null }, "Counter(5) stream");
  }));

check("stream_empty", async () =>
  withClients([{}], async (a) => {
    const result = await withTimeout(collectStream(a.connection, "Counter", 0, 0), WAIT_MS, "empty stream");
    eq(result, { items: [], error: null }, "Counter(0) stream");
  }));

check("stream_concurrent_on_one_connection", async () =>
  withClients([{}], async (a) => {
    const [first, second] = await withTimeout(
      Promise.all([collectStream(a.connection, "Counter", 3, 20), collectStream(a.connection, "Counter", 6, 7)]),
      WAIT_MS,
      "two concurrent streams",
    );
    eq(first, { items: [0, 1, 2], error: null }, "first stream");
    eq(second, { items: [0, 1, 2, 3, 4, 5], error: null }, "second stream");
  }));

check("stream_cancel_by_dispose", async () =>
  withClients([{ listen: ["Message", "Barrier", "StreamCanceled"] }], async (a) => {
    const items = [];
    let ended = null;
    let gotThree;
    const three = new Promise((resolve) => {
      gotThree = resolve;
    });
    const subscription = a.connection.stream("Infinite").subscribe({
      next: (item) => {
        items.push(item);
        if (items.length === 3) gotThree();
      },
      complete: () => {
        ended = "complete";
      },
      error: (err) => {
        ended = `error: ${err && err.message}`;
      },
    });
    await withTimeout(three, WAIT_MS, `3 items of Infinite (got ${show(items)})`);
    subscription.dispose();
    const countAtDispose = items.length;
    await a.expect("StreamCanceled", [], "server-side cancellation callback");
    await sleep(QUIET_MS);
    eq(items.slice(0, 3), [0, 1, 2], "first items of Infinite");
    eq(items.length, countAtDispose, "items delivered after dispose");
    eq(ended, null, "subscriber callbacks after dispose");
    eq(a.inbox.filter((m) => m.method === "StreamCanceled").length, 1, "StreamCanceled calls");
    await assertAlive(a, "after stream cancellation");
  }));

check("stream_error_midway", async () =>
  withClients([{}], async (a) => {
    const result = await withTimeout(collectStream(a.connection, "StreamFails", 2), WAIT_MS, "StreamFails");
    eq(result, { items: [0, 1], error: "An error occurred on the server while streaming results." }, "stream");
    await assertAlive(a, "after a failed stream");
  }));

check("stream_error_midway_detailed", async () =>
  withClients([{ path: "/detailed" }], async (a) => {
    const result = await withTimeout(collectStream(a.connection, "StreamFails", 3), WAIT_MS, "StreamFails");
    eq(
      result,
      { items: [0, 1, 2], error: "An error occurred on the server while streaming results. Boom: stream broke" },
      "stream on /detailed",
    );
  }));

check("stream_error_before_first_item", async () =>
  withClients([{}], async (a) => {
    const result = await withTimeout(collectStream(a.connection, "StreamFails", 0), WAIT_MS, "StreamFails(0)");
    eq(result, { items: [], error: "An unexpected error occurred invoking 'StreamFails' on the server." }, "stream");
  }));

// client-to-server (upload) streams

check("upload_stream_concat", async () =>
  withClients([{}], async (a) => {
    const subject = new signalR.Subject();
    const result = a.connection.invoke("UploadConcat", subject);
    for (const part of ["a", "b", " 漢字", "😀"]) {
      subject.next(part);
      await sleep(5);
    }
    subject.complete();
    eq(await withTimeout(result, WAIT_MS, "UploadConcat"), "ab 漢字😀", "UploadConcat result");
  }));

check("upload_stream_with_leading_argument", async () =>
  withClients([{}], async (a) => {
    // Bursts larger than the server's per-stream buffer (10 items): the completion often arrives
    // while the buffer is full, which must not lose buffered items. Several rounds, as the timing varies.
    for (let round = 0; round < 16; round += 1) {
      const subject = new signalR.Subject();
      const result = a.connection.invoke("UploadSum", "total=", subject);
      for (let i = 1; i <= 20 + round; i += 1) subject.next(i);
      subject.complete();
      const n = 20 + round;
      eq(await withTimeout(result, WAIT_MS, "UploadSum"), `total=${(n * (n + 1)) / 2}`, `UploadSum round ${round}`);
    }
  }));

check("upload_stream_empty", async () =>
  withClients([{}], async (a) => {
    const subject = new signalR.Subject();
    const result = a.connection.invoke("UploadConcat", subject);
    subject.complete();
    eq(await withTimeout(result, WAIT_MS, "UploadConcat"), "", "UploadConcat of nothing");
  }));

check("upload_stream_client_error", async () =>
  withClients([{}], async (a) => {
    const subject = new signalR.Subject();
    const result = a.connection.invoke("UploadConcat", subject);
    subject.next("partial");
    subject.error(new Error("Something bad"));
    eq(
      await rejectionOf(result, "UploadConcat with a failed upload"),
      "An unexpected error occurred invoking 'UploadConcat' on the server. HubException: Something bad",
      "error text",
    );
    await assertAlive(a, "after a failed upload");
  }));

// client results

async function clientResult(connectionId) {
  const response = await withTimeout(
    fetch(new URL(`/clientresult/${encodeURIComponent(connectionId)}`, baseUrl)),
    15000,
    "GET /clientresult",
  );
  eq(response.status, 200, "GET /clientresult status");
  return response.text();
}

check("client_result_value", async () =>
  withClients([{ setup: (c) => c.on("Result", () => 10) }], async (a) => {
    eq(await clientResult(a.id), "10", "client result");
  }));

check("client_result_handler_throws", async () =>
  withClients(
    [
      {
        setup: (c) =>
          c.on("Result", () => {
            throw new Error("from callback");
          }),
      },
    ],
    async (a) => {
      eq(await clientResult(a.id), "Error: from callback", "client result error");
      await assertAlive(a, "after a failed client result");
    },
  ));

check("client_result_no_handler", async () =>
  withClients([{}], async (a) => {
    eq(await clientResult(a.id), "Client didn't provide a result.", "client result without handler");
  }));

check("client_result_async_handler", async () =>
  withClients(
    [
      {
        setup: (c) =>
          c.on("Result", async () => {
            await sleep(50);
            return 10;
          }),
      },
    ],
    async (a) => {
      eq(await clientResult(a.id), "10", "client result of an async handler");
    },
  ));

// exact error texts

const errorCases = [
  ["error_unknown_method", "/hub", ["NoSuchMethod", 1], "Unknown hub method 'NoSuchMethod'"],
  ["error_unknown_method_detailed", "/detailed", ["NoSuchMethod"], "Unknown hub method 'NoSuchMethod'"],
  ["error_hub_method_raises", "/hub", ["Throw", "kaboom"], "An unexpected error occurred invoking 'Throw' on the server."],
  [
    "error_hub_method_raises_detailed",
    "/detailed",
    ["Throw", "kaboom"],
    "An unexpected error occurred invoking 'Throw' on the server. Boom: kaboom",
  ],
  [
    "error_hub_exception",
    "/hub",
    ["ThrowHubException", "told you ✓"],
    "An unexpected error occurred invoking 'ThrowHubException' on the server. HubException: told you ✓",
  ],
  [
    "error_hub_exception_detailed",
    "/detailed",
    ["ThrowHubException", "told you"],
    "An unexpected error occurred invoking 'ThrowHubException' on the server. HubException: told you",
  ],
  ["error_wrong_argument_count", "/hub", ["Add", 1], "Failed to invoke 'Add' due to an error on the server."],
  [
    "error_wrong_argument_count_detailed",
    "/detailed",
    ["Add", 1],
    "Failed to invoke 'Add' due to an error on the server. InvalidDataException: " +
      "Invocation provides 1 argument(s) but target expects 2.",
  ],
  [
    "error_too_many_arguments_detailed",
    "/detailed",
    ["Add", 1, 2, 3],
    "Failed to invoke 'Add' due to an error on the server. InvalidDataException: " +
      "Invocation provides 3 argument(s) but target expects 2.",
  ],
  [
    "error_streaming_method_with_invoke",
    "/hub",
    ["Counter", 1, 1],
    "The client attempted to invoke the streaming 'Counter' method with a non-streaming invocation.",
  ],
];

for (const [name, path, call, expected] of errorCases) {
  check(name, async () =>
    withClients([{ path }], async (a) => {
      eq(await rejectionOf(a.connection.invoke(...call), `invoke ${call[0]}`), expected, "error text");
      await assertAlive(a, "after the error");
    }));
}

check("error_non_streaming_method_with_stream", async () =>
  withClients([{}], async (a) => {
    const result = await withTimeout(collectStream(a.connection, "Echo", "x"), WAIT_MS, "stream('Echo')");
    eq(
      result,
      {
        items: [],
        error: "The client attempted to invoke the non-streaming 'Echo' method with a streaming invocation.",
      },
      "stream of a non-streaming method",
    );
    await assertAlive(a, "after the error");
  }));

// groups

check("group_send_reaches_members_only", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const group = token("group");
    const value = token("v");
    await a.connection.invoke("JoinGroup", group);
    await b.connection.invoke("JoinGroup", group);
    await c.connection.invoke("SendToGroup", group, value);
    await a.expect("Message", ["group", value], "member a");
    await b.expect("Message", ["group", value], "member b");
    await c.expectNone("Message", ["group", value], "non-member c");
  }));

check("group_leave_then_not_received", async () =>
  withClients([{}, {}], async (a, b) => {
    const group = token("group");
    await a.connection.invoke("JoinGroup", group);
    await b.connection.invoke("JoinGroup", group);
    const before = token("before");
    await b.connection.invoke("SendToGroup", group, before);
    await a.expect("Message", ["group", before], "a while a member");
    await a.connection.invoke("LeaveGroup", group);
    const after = token("after");
    await b.connection.invoke("SendToGroup", group, after);
    await b.expect("Message", ["group", after], "b still a member");
    await a.expectNone("Message", ["group", after], "a after leaving");
  }));

check("group_except", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const group = token("group");
    const value = token("v");
    for (const x of [a, b, c]) await x.connection.invoke("JoinGroup", group);
    await a.connection.invoke("SendToGroupExcept", group, [b.id], value);
    await a.expect("Message", ["group_except", value], "a (caller, member)");
    await c.expect("Message", ["group_except", value], "c (member)");
    await b.expectNone("Message", ["group_except", value], "b (excluded)");
  }));

check("group_others_in_group", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const group = token("group");
    const value = token("v");
    await a.connection.invoke("JoinGroup", group);
    await b.connection.invoke("JoinGroup", group);
    await a.connection.invoke("SendToOthersInGroup", group, value);
    await b.expect("Message", ["others_in_group", value], "b (other member)");
    await a.expectNone("Message", ["others_in_group", value], "a (caller)");
    await c.expectNone("Message", ["others_in_group", value], "c (not a member)");
  }));

check("group_multiple_groups", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const g1 = token("g1");
    const g2 = token("g2");
    const value = token("v");
    await a.connection.invoke("JoinGroup", g1);
    await b.connection.invoke("JoinGroup", g2);
    await c.connection.invoke("SendToGroups", [g1, g2], value);
    await a.expect("Message", ["groups", value], "a (in g1)");
    await b.expect("Message", ["groups", value], "b (in g2)");
    await c.expectNone("Message", ["groups", value], "c (in neither)");
  }));

// users

check("user_with_two_connections", async () => {
  const user = token("user");
  const other = token("other");
  return withClients([{ user }, { user }, { user: other }], async (a1, a2, b) => {
    const value = token("v");
    await b.connection.invoke("SendToUser", user, value);
    await a1.expect("Message", ["user", value], "first connection of the user");
    await a2.expect("Message", ["user", value], "second connection of the user");
    await b.expectNone("Message", ["user", value], "another user");
    eq(a1.matching("Message", ["user", value]).length, 1, "copies on the first connection");
  });
});

check("users_list", async () => {
  const u1 = token("u1");
  const u2 = token("u2");
  return withClients([{ user: u1 }, { user: u2 }, { user: token("u3") }, {}], async (a, b, c, anon) => {
    const value = token("v");
    await anon.connection.invoke("SendToUsers", [u1, u2], value);
    await a.expect("Message", ["users", value], "u1");
    await b.expect("Message", ["users", value], "u2");
    await c.expectNone("Message", ["users", value], "u3");
    await anon.expectNone("Message", ["users", value], "anonymous caller");
  });
});

// all / others / all_except / client / clients

check("clients_all", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const value = token("v");
    await a.connection.invoke("SendToAll", value);
    for (const [x, label] of [[a, "a"], [b, "b"], [c, "c"]]) {
      await x.expect("Message", ["all", value], label);
    }
  }));

check("clients_others", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const value = token("v");
    await a.connection.invoke("SendToOthers", value);
    await b.expect("Message", ["others", value], "b");
    await c.expect("Message", ["others", value], "c");
    await a.expectNone("Message", ["others", value], "a (caller)");
  }));

check("clients_all_except", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const value = token("v");
    await a.connection.invoke("SendToAllExcept", [b.id], value);
    await a.expect("Message", ["all_except", value], "a");
    await c.expect("Message", ["all_except", value], "c");
    await b.expectNone("Message", ["all_except", value], "b (excluded)");
  }));

check("clients_client", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const value = token("v");
    await a.connection.invoke("SendToClient", b.id, value);
    await b.expect("Message", ["client", value], "b (target)");
    await a.expectNone("Message", ["client", value], "a (caller)");
    await c.expectNone("Message", ["client", value], "c");
  }));

check("clients_clients", async () =>
  withClients([{}, {}, {}], async (a, b, c) => {
    const value = token("v");
    await a.connection.invoke("SendToClients", [b.id, c.id], value);
    await b.expect("Message", ["clients", value], "b");
    await c.expect("Message", ["clients", value], "c");
    await a.expectNone("Message", ["clients", value], "a (caller)");
  }));

// hub context from an HTTP handler

check("http_broadcast_reaches_all", async () =>
  withClients([{}, { user: "bob" }, { path: "/detailed" }], async (a, b, other) => {
    const value = token("bc");
    const response = await withTimeout(
      fetch(new URL(`/broadcast/${encodeURIComponent(value)}`, baseUrl), { method: "POST" }),
      WAIT_MS,
      "POST /broadcast",
    );
    eq(response.status, 200, "POST /broadcast status");
    eq(await response.json(), { sent: value }, "POST /broadcast body");
    await a.expect("Message", ["http", value], "a");
    await b.expect("Message", ["http", value], "b");
    // the endpoint targets TestHub: a connection of another hub (/detailed) must not get it
    await other.expectNone("Message", ["http", value], "connection of the /detailed hub");
  }));

// -- runner ----------------------------------------------------------------------------------------

function emit(name, ok, detail) {
  process.stdout.write(`${JSON.stringify({ name, ok, detail: String(detail) })}\n`);
}

async function main() {
  if (baseUrl === "--list") {
    for (const { name } of checks) process.stdout.write(`${name}\n`);
    return;
  }
  if (!baseUrl || !["json", "messagepack"].includes(protocolName)) {
    process.stderr.write("usage: scenario.cjs <server-url> <json|messagepack> [check ...]\n");
    process.exitCode = 2;
    return;
  }
  const selected = only.length ? checks.filter((c) => only.includes(c.name)) : checks;
  for (const { name, body } of selected) {
    const started = Date.now();
    try {
      await withTimeout(Promise.resolve().then(body), CHECK_TIMEOUT_MS, `check ${name}`);
      emit(name, true, `${Date.now() - started} ms`);
    } catch (err) {
      const detail = err instanceof CheckFailed ? err.message : (err && err.stack) || String(err);
      emit(name, false, detail);
    }
  }
}

main().then(
  () => process.exit(),
  (err) => {
    process.stderr.write(`scenario crashed: ${(err && err.stack) || err}\n`);
    process.exit(1);
  },
);
