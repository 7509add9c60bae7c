"use strict";
// Clients of tests/test_emitter.py: official JS clients on given instances over every transport and
// protocol, each recording every "Message" it receives (its arguments, JSON-encoded).
// Usage: node clients.cjs '<JSON list of {tag, url, mode, user}>'
//   mode: ws_json | ws_messagepack | sse_json | lp_json | lp_messagepack
// One JSON object per stdout line:
//   {"event": "ready", "clients": [{"tag", "id", "pid"}, ...]}
//   {"event": "joined", "tag", "group"}
//   {"event": "report", "got": {tag: [args, ...]}}
//   {"event": "stopped", "errors": [...]}
//   {"event": "error" | "closed", ...}                      a failure (the test stops)
// stdin commands, one JSON object per line:
//   {"cmd": "join", "tag", "group"}     the client joins a group itself (hub method JoinGroup)
//   {"cmd": "report"}                    what every client got so far
//   {"cmd": "stop"}                      close every connection, then exit

const readline = require("node:readline");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const T = signalR.HttpTransportType;
const MODES = {
  ws_json: [T.WebSockets, "json"],
  ws_messagepack: [T.WebSockets, "messagepack"],
  sse_json: [T.ServerSentEvents, "json"],
  lp_json: [T.LongPolling, "json"],
  lp_messagepack: [T.LongPolling, "messagepack"],
};
const TIMEOUT_MS = 20000;

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function bounded(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${TIMEOUT_MS} ms: ${what}`)), TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const clients = new Map();

async function start({ tag, url, mode, user }) {
  const [transport, protocol] = MODES[mode];
  const target = `${url}/hub` + (user ? `?user=${encodeURIComponent(user)}` : "");
  const builder = new signalR.HubConnectionBuilder()
    .withUrl(target, { transport })
    .configureLogging(signalR.LogLevel.None);
  if (protocol === "messagepack") builder.withHubProtocol(new MessagePackHubProtocol());
  const connection = builder.build();
  const client = { tag, connection, got: [], stopping: false };
  connection.on("Message", (...args) => client.got.push(args));
  connection.onclose((err) => {
    if (!client.stopping) emit({ event: "closed", tag, error: String(err) });
  });
  await bounded(connection.start(), `start ${tag}`);
  const who = await bounded(connection.invoke("Whoami"), `Whoami ${tag}`);
  clients.set(tag, client);
  return { tag, id: who.connectionId, pid: who.pid };
}

async function main() {
  const spec = JSON.parse(process.argv[2]);
  const ready = await Promise.all(spec.map(start));
  emit({ event: "ready", clients: ready });
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const command = JSON.parse(line);
    if (command.cmd === "join") {
      const client = clients.get(command.tag);
      await bounded(client.connection.invoke("JoinGroup", command.group), `join ${command.tag}`);
      emit({ event: "joined", tag: command.tag, group: command.group });
    } else if (command.cmd === "report") {
      emit({ event: "report", got: Object.fromEntries([...clients].map(([tag, c]) => [tag, c.got])) });
    } else if (command.cmd === "stop") {
      for (const c of clients.values()) c.stopping = true;
      const outcomes = await Promise.allSettled([...clients.values()].map((c) => bounded(c.connection.stop(), "stop")));
      emit({ event: "stopped", errors: outcomes.filter((o) => o.status === "rejected").map((o) => String(o.reason)) });
      process.exit(0);
    }
  }
}

main().catch((err) => {
  emit({ event: "error", error: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});
