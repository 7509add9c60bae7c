"use strict";
// One official JS client (@microsoft/signalr 10.0.11) for tests/test_stateful_reconnect.py, with
// withAutomaticReconnect() and, unless "plain" is given, withStatefulReconnect(). One JSON object per
// stdout line:
//   {"event": "ready", "connectionId": "...", "features": {...}}
//   {"event": "reconnecting" | "reconnected" | "closed", "error": "..." | null, "connectionId": ...}
//   {"event": "result", "id": k, "result": ... } or {"event": "result", "id": k, "error": "..."}
//   {"event": "report", "connectionId": "...", "nums": [[i, padLength], ...], "state": "Connected"}
//   {"event": "stopped"}
// stdin commands, one JSON object per line:
//   {"cmd": "invoke", "id": k, "method": "...", "args": [...]}   (the result comes as an event)
//   {"cmd": "report"}, {"cmd": "stop"}
// Usage: node stateful.cjs <hub url> <json|messagepack> <stateful|plain>

const readline = require("node:readline");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const [url, protocol, mode] = [process.argv[2], process.argv[3] || "json", process.argv[4] || "stateful"];

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function plain(value) {
  // MessagePack hands binary as Uint8Array; nothing here sends any, so values are JSON-able as they are
  return value === undefined ? null : value;
}

async function main() {
  let builder = new signalR.HubConnectionBuilder()
    .withUrl(url, { transport: signalR.HttpTransportType.WebSockets })
    .withAutomaticReconnect([0, 500, 1000, 2000])
    .configureLogging(signalR.LogLevel.None);
  if (mode === "stateful") builder = builder.withStatefulReconnect();
  if (protocol === "messagepack") builder = builder.withHubProtocol(new MessagePackHubProtocol());
  const connection = builder.build();
  const nums = [];
  let stopping = false;
  connection.on("Num", (i, pad) => nums.push([i, pad.length]));
  connection.onreconnecting((err) =>
    emit({ event: "reconnecting", error: err ? String(err) : null, connectionId: connection.connectionId }),
  );
  connection.onreconnected((id) => emit({ event: "reconnected", error: null, connectionId: id }));
  connection.onclose((err) => {
    if (!stopping) emit({ event: "closed", error: err ? String(err) : null, connectionId: null });
  });
  await connection.start();
  emit({
    event: "ready",
    connectionId: connection.connectionId,
    // what the client switched on: features.reconnect is true only for a stateful WebSocket connection
    features: { reconnect: connection.connection.features.reconnect === true },
  });
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    if (!line.trim()) continue;
    const command = JSON.parse(line);
    if (command.cmd === "invoke") {
      connection
        .invoke(command.method, ...(command.args || []))
        .then((result) => emit({ event: "result", id: command.id, result: plain(result) }))
        .catch((err) => emit({ event: "result", id: command.id, error: String(err) }));
    } else if (command.cmd === "report") {
      emit({ event: "report", connectionId: connection.connectionId, nums, state: connection.state });
    } else if (command.cmd === "stop") {
      stopping = true;
      await connection.stop();
      emit({ event: "stopped" });
      process.exit(0);
    }
  }
}

main().catch((err) => {
  emit({ event: "error", error: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});
