"use strict";
// Connects the official client over one transport, prints {"connectionId": ...} and then just stays
// connected, so a test can kill the process (a client that vanishes without stopping) and watch the
// server notice. Exits by itself after 60 s so it can never outlive a test run.
//
// Usage: node tests/interop/vanishing-client.cjs <base-url> <transport>

const signalR = require("@microsoft/signalr");

const [baseUrl, transportName] = process.argv.slice(2);
setTimeout(() => process.exit(3), 60000).unref();

async function main() {
  const connection = new signalR.HubConnectionBuilder()
    .withUrl(`${baseUrl}/testhub`, { transport: signalR.HttpTransportType[transportName] })
    .configureLogging(signalR.LogLevel.None)
    .build();
  await connection.start();
  const serverId = await connection.invoke("GetCallerConnectionId");
  process.stdout.write(`${JSON.stringify({ connectionId: connection.connectionId, serverId })}\n`);
  await new Promise((resolve) => setTimeout(resolve, 60000));
}

main().catch((err) => {
  process.stderr.write(`${err && err.stack}\n`);
  process.exit(2);
});
