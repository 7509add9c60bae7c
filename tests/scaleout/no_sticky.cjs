"use strict";
// No sticky sessions: the official client behind a round-robin proxy, so its negotiate lands on one
// instance and its WebSocket on another (the signed connection token lets the second take over).
//
// Usage: node tests/scaleout/no_sticky.cjs <url1> <url2> <url3>
// The proxy (loopback, ephemeral port) forwards each HTTP request and each WebSocket upgrade to the
// next backend in turn and logs where each went. Prints one JSON line per check (see lib.cjs).

const http = require("node:http");
const net = require("node:net");
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
  stopAll,
  unique,
} = require("./lib.cjs");

const backends = process.argv.slice(2).map((u) => new URL(u));

function startProxy() {
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
      res.writeHead(502);
      res.end();
    });
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

run(async () => {
  const proxy = await startProxy();
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
