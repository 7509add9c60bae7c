"use strict";
// No sticky sessions: the official client behind a round-robin proxy, so its negotiate lands on one
// instance and its WebSocket on another (the signed connection token lets the second take over).
//
// Usage: node tests/scaleout/no_sticky.cjs <url1> <url2> <url3>
// The proxy (loopback, ephemeral port) forwards each HTTP request and each WebSocket upgrade to the
// next backend in turn and logs where each went. Prints one JSON line per check (see lib.cjs).

const {
  check,
  connect,
  ensure,
  eq,
  expectExactlyOnce,
  getJson,
  invoke,
  post,
  run,
  startProxy,
  stopAll,
  unique,
} = require("./lib.cjs");

const backends = process.argv.slice(2).map((u) => new URL(u));


run(async () => {
  const proxy = await startProxy(backends);
  const pids = [];
  for (const backend of backends) pids.push(Number(await (await fetch(new URL("/whoami", backend))).text()));
  const clients = [];

  await check("no_sticky_negotiate_and_websocket_on_different_instances", async () => {
    const placements = [];
    for (const [i, protocol] of ["json", "messagepack", "json"].entries()) {
      const before = proxy.log.length;
      const client = await connect(proxy.url, { tag: `p${i}`, protocol, user: "proxied" });
      clients.push(client);
      const entries = proxy.log.slice(before);
      const negotiate = entries.find((e) => e.kind === "http" && e.path.startsWith("/hub/negotiate"));
      const socket = entries.find((e) => e.kind === "websocket");
      ensure(negotiate && socket, `proxy log for ${client.tag}: ${JSON.stringify(entries)}`);
      ensure(negotiate.backend !== socket.backend, `negotiate and WebSocket both on backend ${socket.backend}`);
      client.wsBackend = socket.backend;
      placements.push(`${client.tag}: negotiate@${negotiate.backend + 1} ws@${socket.backend + 1}`);
    }
    return placements.join("; ");
  });
  if (clients.length !== 3) return;

  await check("no_sticky_invocations_served_by_websocket_instance", async () => {
    for (const client of clients) {
      const me = await invoke(client, "Whoami");
      eq(me.connectionId, client.id, `${client.tag}'s connection id on the server`);
      eq(me.pid, pids[client.wsBackend], `${client.tag} served by the instance holding its WebSocket`);
    }
  });

  await check("no_sticky_broadcast_reaches_proxied_clients_once", async () => {
    const value = unique("proxied");
    await post(`${backends[0].origin}/publish/${value}`);
    return expectExactlyOnce(clients, clients, `http:${value}`);
  });

  await check("no_sticky_client_and_user_sends", async () => {
    const v1 = unique("to-client");
    await invoke(clients[0], "SendClient", clients[2].id, v1);
    await expectExactlyOnce(clients, [clients[2]], `client:${v1}`);
    const v2 = unique("to-user");
    await invoke(clients[1], "SendUser", "proxied", v2);
    await expectExactlyOnce(clients, clients, `user:${v2}`);
    const health = await getJson(`${backends[0].origin}/health`);
    ensure(health.state === "connected", `instance 1 health: ${JSON.stringify(health)}`);
  });

  await stopAll(clients);
  proxy.server.close();
});
