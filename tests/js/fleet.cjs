"use strict";
// Many official JS clients (@microsoft/signalr 10.0.11) in one process, for tests/test_drain.py.
// Each one counts the numbered "Tick" broadcasts it receives and its reconnects. One JSON object
// per stdout line:
//   {"event": "ready", "clients": [{"kind": ..., "connectionId": ...}, ...]}
//   {"event": "report", "clients": [{kind, state, firstId, connectionId, reconnecting, reconnected,
//                                    closed, ticks: {first, last, count, duplicates, missing}}]}
// stdin commands, one JSON object per line: {"cmd": "report"}, {"cmd": "stop"}
// Usage: node fleet.cjs <hub url> <kinds as JSON: [{"transport": "ws"|"sse"|"lp",
//                                                  "protocol": "json"|"messagepack", "stateful": bool}]>

const readline = require("node:readline");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");
const { summary } = require("./ticks.cjs");

const [url, kindsText] = [process.argv[2], process.argv[3]];
const TRANSPORTS = {
  ws: signalR.HttpTransportType.WebSockets,
  sse: signalR.HttpTransportType.ServerSentEvents,
  lp: signalR.HttpTransportType.LongPolling,
};

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function client(kind) {
  const state = { kind, connection: null, ticks: [], reconnecting: 0, reconnected: 0, closed: 0, firstId: null, log: [] };
  let builder = new signalR.HubConnectionBuilder()
    .withUrl(url, { transport: TRANSPORTS[kind.transport] })
    .withAutomaticReconnect([0, 250, 500, 1000, 1000, 2000, 2000, 5000])
    .configureLogging({
      log: (level, message) => {
        if (level < signalR.LogLevel.Debug) return;
        state.log.push(`${new Date().toISOString()} ${level} ${message}`);
        if (state.log.length > 200) state.log.shift();
      },
    });
  if (kind.stateful) builder = builder.withStatefulReconnect();
  if (kind.protocol === "messagepack") builder = builder.withHubProtocol(new MessagePackHubProtocol());
  const connection = builder.build();
  state.connection = connection;
  connection.on("Tick", (n) => {
    state.ticks.push(n); // a handler returning a value would be taken for a client result
  });
  connection.onreconnecting(() => state.reconnecting++);
  connection.onreconnected(() => state.reconnected++);
  connection.onclose(() => state.closed++);
  return state;
}

// what the official client throws from its own event handlers (not catchable by the caller):
// reported, with the client's debug log, instead of ending every client of the process
const CRASHES = [];
process.on("uncaughtException", (err) => CRASHES.push(String(err && err.stack ? err.stack : err)));

async function main() {
  const clients = JSON.parse(kindsText).map(client);
  for (const c of clients) {
    await c.connection.start();
    c.firstId = c.connection.connectionId;
  }
  emit({ event: "ready", clients: clients.map((c) => ({ kind: c.kind, connectionId: c.firstId })) });
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    if (!line.trim()) continue;
    const command = JSON.parse(line);
    if (command.cmd === "report") {
      emit({
        event: "report",
        clients: clients.map((c) => ({
          kind: c.kind,
          state: c.connection.state,
          firstId: c.firstId,
          connectionId: c.connection.connectionId,
          reconnecting: c.reconnecting,
          reconnected: c.reconnected,
          closed: c.closed,
          ticks: summary(c.ticks),
          log: c.kind.transport === "sse" || c.state !== "Connected" || (c.kind.stateful && c.reconnecting) ? c.log.slice(-40) : [],
        })),
        crashes: CRASHES,
      });
    } else if (command.cmd === "stop") {
      for (const c of clients) c.closed = -1000; // stopping on purpose is not a close to count
      await Promise.all(clients.map((c) => c.connection.stop()));
      emit({ event: "stopped" });
      process.exit(0);
    }
  }
}

main().catch((err) => {
  emit({ event: "error", error: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});
