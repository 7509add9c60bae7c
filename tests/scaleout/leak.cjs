"use strict";
// Subscriptions follow membership: group/user/connection channels are released when the last local
// member goes, including members added from another instance.
//
// Usage: node tests/scaleout/leak.cjs <url1> <url2> <url3>
// Steps (the test reads PUBSUB NUMSUB / CHANNELS at each): "joined", "one_left", "instance1_left",
// "stopped". Prints one JSON line per check (see lib.cjs).

const { check, connect, eq, invoke, run, step, stopAll, unique } = require("./lib.cjs");

const [url1, url2, url3] = process.argv.slice(2);

run(async () => {
  const group = unique("leak-group");
  const remoteGroup = unique("leak-remote");
  const user = unique("leak-user");
  const clients = [];
  let l1a, l1b, l2, l3;
  const ok = await check("leak_setup", async () => {
    l1a = await connect(url1, { tag: "l1a", user });
    l1b = await connect(url1, { tag: "l1b", user });
    l2 = await connect(url2, { tag: "l2", user });
    l3 = await connect(url3, { tag: "l3", user });
    clients.push(l1a, l1b, l2, l3);
    for (const client of clients) await invoke(client, "JoinGroup", group);
    eq(await invoke(l1a, "AddToGroup", l3.id, remoteGroup), "ok", "AddToGroup(l3) from instance 1");
    await invoke(l2, "JoinGroup", remoteGroup);
  });
  if (!ok) return;
  const ids = clients.map((c) => c.id);
  const info = { group, remoteGroup, user, ids };

  await step("joined", info);
  await invoke(l1a, "LeaveGroup", group);
  await step("one_left", info);
  await invoke(l1b, "LeaveGroup", group);
  await step("instance1_left", info);
  await stopAll(clients);
  await step("stopped", info);
});
