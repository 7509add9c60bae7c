"use strict";
// The official @microsoft/signalr client (Node) against the interop app, for ONE transport and
// ONE hub protocol: every behaviour of interop-contract.md that depends on them. Prints one JSON
// line per check: {"name", "ok", "detail", "ms"}.
//
// Usage: node tests/interop/hub-checks.cjs <base-url> <WebSockets|ServerSentEvents|LongPolling>
//                                           <json|messagepack> [check-name ...]

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");
const { getUserAgentHeader } = require("@microsoft/signalr/dist/cjs/Utils");
// the WebSocket library the client itself loads in Node
const WS = require(require.resolve("ws", { paths: [require.resolve("@microsoft/signalr")] }));
const {
  WAIT_MS,
  deferred,
  eq,
  makeToken,
  ok,
  rejectionOf,
  runChecks,
  sleep,
  stderrLogger,
  withTimeout,
} = require("./common.cjs");

const [baseUrl, transportName, protocolName, ...only] = process.argv.slice(2);
const transport = signalR.HttpTransportType[transportName];
const msgpack = protocolName === "messagepack";
const logger = stderrLogger(`${transportName}/${protocolName}`);
const TOO_LARGE = "x".repeat(40000);

function builder(path, options = {}) {
  const b = new signalR.HubConnectionBuilder()
    .withUrl(`${baseUrl}${path}`, { transport, ...options })
    .configureLogging(logger);
  if (msgpack) b.withHubProtocol(new MessagePackHubProtocol());
  return b;
}

/** Builds and starts a connection to `path`, stopped again after the check. */
async function connect(ctx, path = "/testhub", options = {}, configure = (b) => b) {
  const connection = configure(builder(path, options)).build();
  ctx.cleanup(() => connection.stop());
  await withTimeout(connection.start(), WAIT_MS, `start ${path}`);
  return connection;
}

function nextCall(connection, method) {
  const d = deferred();
  connection.on(method, (...args) => d.resolve(args));
  return d.promise;
}

async function clientResult(connection) {
  const response = await fetch(`${baseUrl}/clientresult/${connection.connectionId}`);
  return response.text();
}

const checks = [
  ["connection_id_matches_server", async (ctx) => {
    const c = await connect(ctx);
    eq(await c.invoke("GetCallerConnectionId"), c.connectionId, "GetCallerConnectionId");
  }],
  ["active_transport_name", async (ctx) => {
    const c = await connect(ctx);
    eq(await c.invoke("GetActiveTransportName"), transportName, "GetActiveTransportName");
  }],
  ["invoke_echo", async (ctx) => {
    const c = await connect(ctx);
    eq(await c.invoke("Echo", "Hello World!"), "Hello World!", "ascii");
    eq(await c.invoke("Echo", "これはテストです 你好 🙂"), "これはテストです 你好 🙂", "non-ascii");
    eq(await c.invoke("echo", "lower-case method name"), "lower-case method name", "case-insensitive method");
  }],
  ["send_fire_and_forget_then_invoke", async (ctx) => {
    const c = await connect(ctx);
    await c.send("Echo", "ignored");
    eq(await c.invoke("Echo", "after send"), "after send", "invoke after send");
  }],
  ["server_calls_client_method_any_case", async (ctx) => {
    const c = await connect(ctx);
    const got = nextCall(c, "mEsSaGe");
    await c.invoke("InvokeWithString", "hello from the hub");
    eq(await withTimeout(got, WAIT_MS, "Message"), ["hello from the hub"], "Message args");
  }],
  ["custom_object_pascal_case", async (ctx) => {
    const c = await connect(ctx);
    const got = nextCall(c, "CustomObject");
    await c.invoke("SendCustomObject", { Name: "test", Value: 42 });
    eq(await withTimeout(got, WAIT_MS, "CustomObject"), [{ Name: "test", Value: 42 }], "CustomObject args");
  }],
  ["stream_items", async (ctx) => {
    const c = await connect(ctx);
    const items = [];
    const done = deferred();
    c.stream("Stream").subscribe({ next: (i) => items.push(i), error: done.reject, complete: done.resolve });
    await withTimeout(done.promise, WAIT_MS, "stream completion");
    eq(items, ["a", "b", "c"], "items");
  }],
  ["stream_empty", async (ctx) => {
    const c = await connect(ctx);
    const items = [];
    const done = deferred();
    c.stream("EmptyStream").subscribe({ next: (i) => items.push(i), error: done.reject, complete: done.resolve });
    await withTimeout(done.promise, WAIT_MS, "stream completion");
    eq(items, [], "items");
  }],
  ["stream_cancel_reaches_server", async (ctx) => {
    const c = await connect(ctx);
    const canceled = nextCall(c, "StreamCanceled");
    const failed = deferred();
    const sub = c.stream("InfiniteStream").subscribe({ next: () => {}, error: failed.reject, complete: () => {} });
    sub.dispose(); // right behind the StreamInvocation
    await withTimeout(Promise.race([canceled, failed.promise]), WAIT_MS, "StreamCanceled");
    eq(await c.invoke("Echo", "still up"), "still up", "connection usable after cancel");
  }],
  ["error_hub_method_threw", async (ctx) => {
    const c = await connect(ctx);
    eq(
      await rejectionOf(c.invoke("ThrowException", "An error occurred."), "ThrowException"),
      "An unexpected error occurred invoking 'ThrowException' on the server. InvalidOperationException: An error occurred.",
      "error text",
    );
  }],
  ["error_stream_threw_before_streaming", async (ctx) => {
    const c = await connect(ctx);
    const done = deferred();
    c.stream("StreamThrowException", "An error occurred.").subscribe({
      next: () => done.reject(new Error("unexpected item")),
      error: (err) => done.resolve(err.message),
      complete: () => done.reject(new Error("unexpected completion")),
    });
    eq(
      await withTimeout(done.promise, WAIT_MS, "stream error"),
      "An unexpected error occurred invoking 'StreamThrowException' on the server. InvalidOperationException: An error occurred.",
      "error text",
    );
  }],
  ["error_unknown_method", async (ctx) => {
    const c = await connect(ctx);
    eq(await rejectionOf(c.invoke("!@#$%"), "unknown"), "Unknown hub method '!@#$%'", "error text");
  }],
  ["error_streaming_method_invoked", async (ctx) => {
    const c = await connect(ctx);
    eq(
      await rejectionOf(c.invoke("EmptyStream"), "EmptyStream"),
      "The client attempted to invoke the streaming 'EmptyStream' method with a non-streaming invocation.",
      "error text",
    );
  }],
  ["error_non_streaming_method_streamed", async (ctx) => {
    const c = await connect(ctx);
    const done = deferred();
    c.stream("Echo", "x").subscribe({ next: () => {}, error: (e) => done.resolve(e.message), complete: () => done.resolve(null) });
    eq(
      await withTimeout(done.promise, WAIT_MS, "stream error"),
      "The client attempted to invoke the non-streaming 'Echo' method with a streaming invocation.",
      "error text",
    );
  }],
  ["upload_stream_concat", async (ctx) => {
    const c = await connect(ctx);
    const subject = new signalR.Subject();
    const result = c.invoke("StreamingConcat", subject);
    subject.next("a");
    subject.next("b");
    subject.next("c");
    subject.complete();
    eq(await withTimeout(result, WAIT_MS, "StreamingConcat"), "abc", "result");
  }],
  ["upload_stream_client_error", async (ctx) => {
    const c = await connect(ctx);
    const subject = new signalR.Subject();
    const result = c.invoke("StreamingConcat", subject);
    subject.next("a");
    subject.error(new Error("Something bad"));
    eq(
      await rejectionOf(result, "StreamingConcat"),
      "An unexpected error occurred invoking 'StreamingConcat' on the server. HubException: Something bad",
      "error text",
    );
  }],
  ["client_result_value", async (ctx) => {
    const c = await connect(ctx);
    c.on("Result", () => 10);
    eq(await withTimeout(clientResult(c), WAIT_MS, "/clientresult"), "10", "body");
  }],
  ["client_result_handler_throws", async (ctx) => {
    const c = await connect(ctx);
    c.on("Result", () => {
      throw new Error("from callback");
    });
    eq(await withTimeout(clientResult(c), WAIT_MS, "/clientresult"), "Error: from callback", "body");
  }],
  ["client_result_no_handler", async (ctx) => {
    const c = await connect(ctx);
    eq(await withTimeout(clientResult(c), WAIT_MS, "/clientresult"), "Client didn't provide a result.", "body");
  }],
  ["request_user_agent_header", async (ctx) => {
    const c = await connect(ctx);
    eq(await c.invoke("GetHeader", "User-Agent"), getUserAgentHeader()[1], "User-Agent");
  }],
  ["request_custom_header", async (ctx) => {
    const c = await connect(ctx, "/testhub", { headers: { "X-HEADER": "VALUE" } });
    eq(await c.invoke("GetHeader", "x-header"), "VALUE", "X-HEADER");
    eq(await c.invoke("GetHeader", "X-Not-Sent"), null, "absent header");
  }],
  ["different_types_round_trip", async (ctx) => {
    const c = await connect(ctx);
    const sent = {
      String: "Hello, World!",
      IntArray: [0x01, 0x02, 0x03, 0xff],
      ByteArray: msgpack ? new Uint8Array([0x68, 0x65, 0x6c, 0x6c, 0x6f]) : "aGVsbG8=",
      Guid: "00010203-0405-0607-0706-050403020100",
      DateTime: msgpack ? new Date(Date.UTC(2002, 3, 1, 10, 20, 15)) : "2002-04-01T10:20:15Z",
    };
    const back = await c.invoke("EchoComplexObject", sent);
    if (msgpack) back.ByteArray = new Uint8Array(back.ByteArray);
    eq(back, sent, "EchoComplexObject");
    const made = await c.invoke("SendComplexObject");
    if (msgpack) made.ByteArray = new Uint8Array(made.ByteArray);
    eq(made, {
      String: "hello world",
      IntArray: [1, 2, 3],
      ByteArray: msgpack ? new Uint8Array([1, 2, 3]) : "AQID",
      Guid: "00010203-0405-0607-0706-050403020100",
      DateTime: msgpack ? new Date(Date.UTC(2000, 0, 1)) : "2000-01-01T00:00:00Z",
    }, "SendComplexObject");
  }],
  ["restart_after_stop", async (ctx) => {
    const c = await connect(ctx);
    const first = c.connectionId;
    await c.stop();
    await withTimeout(c.start(), WAIT_MS, "second start");
    ok(c.connectionId && c.connectionId !== first, `new connection id after restart (${first} -> ${c.connectionId})`);
    eq(await c.invoke("Echo", "again"), "again", "echo after restart");
  }],
  ["stop_closes_without_error", async (ctx) => {
    const c = await connect(ctx);
    const closed = deferred();
    c.onclose((err) => closed.resolve(err));
    await c.stop();
    eq(await withTimeout(closed.promise, WAIT_MS, "onclose"), undefined, "close error");
  }],
  ["on_disconnected_runs_once", async (ctx) => {
    const c = await connect(ctx);
    const id = c.connectionId;
    await c.stop();
    let count = "0";
    for (let i = 0; i < 50 && count === "0"; i++) {
      count = await (await fetch(`${baseUrl}/disconnected/${id}`)).text();
      if (count === "0") await sleep(100);
    }
    await sleep(300);
    eq(await (await fetch(`${baseUrl}/disconnected/${id}`)).text(), "1", "on_disconnected calls");
  }],
  ["message_too_large_closes_then_reconnects", async (ctx) => {
    const c = await connect(ctx, "/testhub", {}, (b) => b.withAutomaticReconnect());
    const first = c.connectionId;
    const reconnecting = deferred();
    const reconnected = deferred();
    c.onreconnecting((err) => reconnecting.resolve(err));
    c.onreconnected((id) => reconnected.resolve(id));
    const failed = c.invoke("Echo", TOO_LARGE).then(() => "resolved", (e) => e.message);
    const err = await withTimeout(reconnecting.promise, WAIT_MS, "onreconnecting");
    const prefix = "Server returned an error on close: Connection closed with an error.";
    ok(err && err.message.startsWith(prefix), `reconnecting error starts with ${prefix}: ${err && err.message}`);
    ok((await failed) !== "resolved", "the oversized invoke failed");
    const second = await withTimeout(reconnected.promise, WAIT_MS, "onreconnected");
    ok(second && second !== first, `new connection id (${first} -> ${second})`);
    eq(await c.invoke("Echo", "back"), "back", "echo after reconnect");
  }],
  ["reconnect_after_server_timeout", async (ctx) => {
    const c = await connect(ctx, "/testhub", {}, (b) => b.withAutomaticReconnect());
    const first = c.connectionId;
    const reconnected = deferred();
    c.onreconnected((id) => reconnected.resolve(id));
    c.serverTimeout(); // the client's own "server went silent" path
    const second = await withTimeout(reconnected.promise, WAIT_MS, "onreconnected");
    ok(second && second !== first, `new connection id (${first} -> ${second})`);
    eq(await c.invoke("GetCallerConnectionId"), second, "server sees the new id");
  }],
  ["jwt_token_from_server_sync_factory", async (ctx) => {
    const token = await (await fetch(`${baseUrl}/generateJwtToken`)).text();
    const c = await connect(ctx, "/authorizedhub", { accessTokenFactory: () => token });
    eq(await c.invoke("Echo", "authorized"), "authorized", "Echo");
  }],
  ["jwt_token_from_server_async_factory", async (ctx) => {
    const c = await connect(ctx, "/authorizedhub", {
      accessTokenFactory: async () => (await fetch(`${baseUrl}/generateJwtToken`)).text(),
    });
    eq(await c.invoke("Echo", "authorized"), "authorized", "Echo");
  }],
  ["unauthorized_negotiate_401", async () => {
    const c = builder("/authorizedhub").build();
    eq(
      await rejectionOf(c.start(), "start"),
      "Failed to complete negotiation with the server: Error: Unauthorized: Status code '401'",
      "start error",
    );
  }],
  ["expired_token_negotiate_401", async () => {
    const c = builder("/authorizedhub", { accessTokenFactory: () => makeToken(-60) }).build();
    eq(
      await rejectionOf(c.start(), "start"),
      "Failed to complete negotiation with the server: Error: Unauthorized: Status code '401'",
      "start error",
    );
  }],
  ["wrongly_signed_token_negotiate_401", async () => {
    const forged = makeToken(600, "not-the-server-key-0123456789abcdef");
    const c = builder("/authorizedhub", { accessTokenFactory: () => forged }).build();
    eq(
      await rejectionOf(c.start(), "start"),
      "Failed to complete negotiation with the server: Error: Unauthorized: Status code '401'",
      "start error",
    );
  }],
];

if (transport !== signalR.HttpTransportType.WebSockets) {
  // SSE and long polling authorize every POST/poll: a token that expires mid-connection stops it
  checks.push(["expired_token_refused_mid_connection", async (ctx) => {
    const token = makeToken(2);
    const c = await connect(ctx, "/authorizedhub", { accessTokenFactory: () => token });
    const closed = deferred();
    c.onclose((err) => closed.resolve(err && err.message));
    eq(await c.invoke("Echo", "before"), "before", "Echo before expiry");
    await sleep(3200);
    const UNAUTHORIZED = "Unauthorized: Status code '401'";
    const message = await rejectionOf(c.invoke("Echo", "after"), "Echo after expiry");
    if (message !== UNAUTHORIZED) {
      // a long poll sent after the expiry was refused first (401): the connection ended with it, and
      // the invocation found it closed
      eq(message, "Cannot send data if the connection is not in the 'Connected' State.", "Echo error");
      eq(await withTimeout(closed.promise, WAIT_MS, "onclose"), UNAUTHORIZED, "close error");
    }
  }]);
} else {
  // a WebSocket token is checked at the upgrade: a factory that turns bad after negotiate fails it
  checks.push(["expired_token_refused_at_upgrade", async () => {
    let calls = 0;
    const factory = () => (++calls === 1 ? makeToken(600) : makeToken(-60));
    // the client reports any failed upgrade with one generic text (Node has no ErrorEvent), so the
    // status is read from the socket library's own error: it must be the 401, not some other refusal
    const upgradeErrors = [];
    const WebSocket = class extends WS {
      constructor(...args) {
        super(...args);
        this.on("error", (err) => upgradeErrors.push(err.message));
      }
    };
    const c = builder("/authorizedhub", { accessTokenFactory: factory, WebSocket }).build();
    eq(
      await rejectionOf(c.start(), "start with a token that expired before the upgrade"),
      "Unable to connect to the server with any of the available transports. Error: WebSockets failed: " +
        "Error: WebSocket failed to connect. The connection could not be found on the server, either the " +
        "endpoint may not be a SignalR endpoint, the connection ID is not present on the server, or there " +
        "is a proxy blocking WebSockets. If you have multiple servers check that sticky sessions are " +
        "enabled. ServerSentEvents failed: Error: 'ServerSentEvents' is disabled by the client. " +
        "LongPolling failed: Error: 'LongPolling' is disabled by the client.",
      "start error",
    );
    eq(upgradeErrors, ["Unexpected server response: 401"], "upgrade refusal");
    eq(calls, 2, "factory calls (negotiate, upgrade)");
  }]);
}

runChecks(checks, only).then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`${err && err.stack}\n`);
    process.exit(2);
  },
);
