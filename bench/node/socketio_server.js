// The bench server on Node socket.io + @socket.io/redis-adapter (node-redis 4).
//
//   node bench/node/socketio_server.js --port P --redis URL --prefix X
//
// Socket.IO at /socket.io/. permessage-deflate is on (ws's defaults, threshold 256 bytes as hubwire's),
// used only with clients that offer it: the bench's deflate phase. Events (client -> server), the
// same as bench/servers/socketio_py_app.py:
//   broadcast(payload)              io.emit("broadcast", payload): every client of every instance
//   broadcast_data(payload, data)   io.emit("broadcast", payload, data) (the deflate phase)
//   join(name, ack)                 socket.join(name), then ack
//   group_broadcast(name, payload)  io.to(name).emit("broadcast", payload)
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 0, redis: "redis://127.0.0.1:6379", prefix: "bench:" };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in args)) throw new Error(`unknown option ${argv[i]}`);
    args[key] = argv[i + 1];
  }
  args.port = Number(args.port);
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const pubClient = createClient({ url: args.redis });
  const subClient = pubClient.duplicate();
  pubClient.on("error", (err) => console.error("redis pub error", err.message));
  subClient.on("error", (err) => console.error("redis sub error", err.message));
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer((req, res) => {
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient, { key: `${args.prefix}socket.io` }),
    perMessageDeflate: { threshold: 256 },
    serveClient: false,
  });

  io.on("connection", (socket) => {
    socket.on("broadcast", (payload) => {
      io.emit("broadcast", payload);
    });
    socket.on("broadcast_data", (payload, data) => {
      io.emit("broadcast", payload, data);
    });
    socket.on("join", (name, ack) => {
      socket.join(name);
      if (typeof ack === "function") ack(true);
    });
    socket.on("group_broadcast", (name, payload) => {
      io.to(name).emit("broadcast", payload);
    });
  });

  httpServer.listen(args.port, args.host, () => {
    console.log(`socket.io bench server on ${args.host}:${args.port} pid ${process.pid}`);
  });

  const stop = () => {
    io.close();
    Promise.allSettled([pubClient.quit(), subClient.quit()]).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
