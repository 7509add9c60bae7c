"use strict";
// Fan-out across three instances sharing one Redis: every target kind, exclusions, users on several
// instances, remote group changes and client results, with clients on all three instances (JSON and
// MessagePack mixed, so every envelope must carry both serializations).
//
// Usage: node tests/scaleout/cluster.cjs <url1> <url2> <url3> <ack-timeout-seconds>
// Prints one JSON line per check (see lib.cjs).

const {
  check,
  connect,
  ensure,
  eq,
  expectExactlyOnce,
  invoke,
  post,
  run,
  sleep,
  stopAll,
  unique,
} = require("./lib.cjs");

const [url1, url2, url3, ackTimeout] = process.argv.slice(2);

run(async () => {
  // instance 1: a1 (alice, admins), b1 (bob, ops), x1 (anonymous)
  // instance 2: a2 (alice, admins), a2x (alice again), b2 (bob)
  // instance 3: a3 (alice, admins), c3 (carol, ops), x3 (anonymous)
  const spec = [
    ["a1", url1, "alice", "json"],
    ["b1", url1, "bob", "messagepack"],
    ["x1", url1, undefined, "json"],
    ["a2", url2, "alice", "messagepack"],
    ["a2x", url2, "alice", "json"],
    ["b2", url2, "bob", "json"],
    ["a3", url3, "alice", "json"],
    ["c3", url3, "carol", "messagepack"],
    ["x3", url3, undefined, "messagepack"],
  ];
  const all = [];
  const c = {};
  await check("setup_clients_on_three_instances", async () => {
    for (const [tag, base, user, protocol] of spec) {
      c[tag] = await connect(base, { tag, user, protocol });
      all.push(c[tag]);
    }
    for (const tag of ["a1", "a2", "a3"]) await invoke(c[tag], "JoinGroup", "admins");
    for (const tag of ["b1", "c3"]) await invoke(c[tag], "JoinGroup", "ops");
    const pids = {};
    for (const client of all) pids[client.tag] = (await invoke(client, "Whoami")).pid;
    ensure(new Set(Object.values(pids)).size === 3, `clients are not spread over 3 processes: ${JSON.stringify(pids)}`);
    return `${all.length} clients, pids ${JSON.stringify(pids)}`;
  });
  if (all.length !== spec.length) return;
  const others = (...tags) => all.filter((client) => !tags.includes(client.tag));
  const only = (...tags) => tags.map((tag) => c[tag]);

  // -- the seed's check and group fan-out -------------------------------------------------------

  await check("seed_http_publish_reaches_every_client_once", async () => {
    const value = unique("seed");
    await post(`${url1}/publish/${value}`);
    return expectExactlyOnce(all, all, `http:${value}`);
  });

  await check("http_publish_from_each_instance", async () => {
    for (const base of [url2, url3]) {
      const value = unique("http");
      await post(`${base}/publish/${value}`);
      await expectExactlyOnce(all, all, `http:${value}`, `publish on ${base}`);
    }
  });

  await check("group_send_from_instance2_reaches_members_only", async () => {
    const value = unique("admins");
    await invoke(c.b2, "SendGroup", "admins", value);
    return expectExactlyOnce(all, only("a1", "a2", "a3"), `group:${value}`);
  });

  await check("http_group_send_reaches_members_only", async () => {
    const value = unique("http-admins");
    await post(`${url3}/group/admins/${value}`);
    return expectExactlyOnce(all, only("a1", "a2", "a3"), `group:${value}`);
  });

  // -- every target kind ------------------------------------------------------------------------

  await check("target_all", async () => {
    const value = unique("all");
    await invoke(c.x3, "SendAll", value);
    return expectExactlyOnce(all, all, `all:${value}`);
  });

  await check("target_others_excludes_caller_only", async () => {
    const value = unique("others");
    await invoke(c.b2, "SendOthers", value);
    return expectExactlyOnce(all, others("b2"), `others:${value}`);
  });

  await check("target_all_except_remote_ids", async () => {
    const value = unique("except");
    await invoke(c.a1, "SendAllExcept", [c.b2.id, c.c3.id], value);
    return expectExactlyOnce(all, others("b2", "c3"), `all_except:${value}`);
  });

  await check("target_client_on_other_instance", async () => {
    const value = unique("client");
    await invoke(c.a1, "SendClient", c.c3.id, value);
    return expectExactlyOnce(all, only("c3"), `client:${value}`);
  });

  await check("target_client_on_same_instance", async () => {
    const value = unique("client-local");
    await invoke(c.a1, "SendClient", c.x1.id, value);
    return expectExactlyOnce(all, only("x1"), `client:${value}`);
  });

  await check("target_clients_local_and_remote", async () => {
    const value = unique("clients");
    await invoke(c.x1, "SendClients", [c.a2.id, c.c3.id, c.x1.id, c.b1.id], value);
    return expectExactlyOnce(all, only("a2", "c3", "x1", "b1"), `clients:${value}`);
  });

  await check("target_groups", async () => {
    const value = unique("groups");
    await invoke(c.b2, "SendGroups", ["admins", "ops"], value);
    return expectExactlyOnce(all, only("a1", "a2", "a3", "b1", "c3"), `groups:${value}`);
  });

  await check("target_group_except_remote_member", async () => {
    const value = unique("group-except");
    await invoke(c.c3, "SendGroupExcept", "admins", [c.a2.id], value);
    return expectExactlyOnce(all, only("a1", "a3"), `group_except:${value}`);
  });

  await check("target_others_in_group", async () => {
    const value = unique("others-in-group");
    await invoke(c.a3, "SendOthersInGroup", "admins", value);
    return expectExactlyOnce(all, only("a1", "a2"), `others_in_group:${value}`);
  });

  await check("target_user_with_connections_on_three_instances", async () => {
    const value = unique("user");
    await invoke(c.x1, "SendUser", "alice", value);
    return expectExactlyOnce(all, only("a1", "a2", "a2x", "a3"), `user:${value}`);
  });

  await check("target_users", async () => {
    const value = unique("users");
    await invoke(c.c3, "SendUsers", ["bob", "carol"], value);
    return expectExactlyOnce(all, only("b1", "b2", "c3"), `users:${value}`);
  });

  await check("target_unknown_user_and_empty_group_reach_nobody", async () => {
    const value = unique("nobody");
    await invoke(c.a1, "SendUser", "nobody", value);
    await invoke(c.a1, "SendGroup", "no-such-group", value);
    await sleep(300);
    const strays = all.filter((client) => client.got.some((m) => m.endsWith(`:${value}`)));
    eq(strays.map((client) => client.tag), [], "clients that got a send to nobody");
  });

  await check("group_names_unicode_and_pattern_characters_are_literal", async () => {
    const star = "g*";
    const unicode = "grüppe ✓ :x";
    await invoke(c.x1, "JoinGroup", star);
    await invoke(c.x3, "JoinGroup", star);
    await invoke(c.b2, "JoinGroup", unicode);
    await invoke(c.a3, "JoinGroup", "gx"); // would match "g*" if it were a pattern
    const v1 = unique("star");
    await invoke(c.a2, "SendGroup", star, v1);
    await expectExactlyOnce(all, only("x1", "x3"), `group:${v1}`, "send to g*");
    const v2 = unique("unicode");
    await invoke(c.a1, "SendGroup", unicode, v2);
    await expectExactlyOnce(all, only("b2"), `group:${v2}`, "send to a unicode group");
  });

  await check("leave_group_on_one_instance_then_rejoin", async () => {
    await invoke(c.a2, "LeaveGroup", "admins");
    const v1 = unique("after-leave");
    await invoke(c.x1, "SendGroup", "admins", v1);
    await expectExactlyOnce(all, only("a1", "a3"), `group:${v1}`, "send after a2 left");
    await invoke(c.a2, "JoinGroup", "admins");
    const v2 = unique("after-rejoin");
    await invoke(c.x1, "SendGroup", "admins", v2);
    await expectExactlyOnce(all, only("a1", "a2", "a3"), `group:${v2}`, "send after a2 rejoined");
  });

  // -- group changes for a connection on another instance ---------------------------------------

  await check("add_to_group_remote_connection", async () => {
    const group = unique("remote-added");
    eq(await invoke(c.a1, "AddToGroup", c.c3.id, group), "ok", "AddToGroup(c3 on instance 3) from instance 1");
    const value = unique("remote-group");
    await invoke(c.b2, "SendGroup", group, value);
    return expectExactlyOnce(all, only("c3"), `group:${value}`);
  });

  await check("add_to_group_unknown_connection_clear_error", async () => {
    const start = Date.now();
    const answer = await invoke(c.x1, "AddToGroup", "no-such-connection", "g");
    const elapsed = Date.now() - start;
    eq(
      answer,
      `error: Could not add connection 'no-such-connection' to group 'g': no instance acknowledged ` +
        `within ${Number(ackTimeout)}s (the connection does not exist or Redis is unreachable).`,
      "AddToGroup for a connection no instance holds",
    );
    ensure(elapsed < Number(ackTimeout) * 1000 + 3000, `took ${elapsed} ms (ack timeout ${ackTimeout}s)`);
    return `${elapsed} ms`;
  });

  // -- client results across instances ----------------------------------------------------------

  await check("client_result_from_other_instance", async () => {
    eq(await invoke(c.a1, "AskClient", c.c3.id), "result-c3", "AskClient(c3) from instance 1 (json asks msgpack)");
    eq(await invoke(c.b1, "AskClient", c.a3.id), "result-a3", "AskClient(a3) from instance 1 (msgpack asks json)");
    eq(await invoke(c.a3, "AskClient", c.a2.id), "result-a2", "AskClient(a2) from instance 3");
  });

  await check("client_result_same_instance", async () => {
    eq(await invoke(c.a1, "AskClient", c.x1.id), "result-x1", "AskClient(x1) on instance 1");
  });

  await check("client_result_unknown_connection", async () => {
    eq(await invoke(c.a1, "AskClient", "x"), "error: Connection 'x' does not exist.", "AskClient('x')");
  });

  await check("client_result_remote_connection_disconnects", async () => {
    let asked;
    const askedPromise = new Promise((resolve) => {
      asked = resolve;
    });
    const slow = await connect(url3, {
      tag: "slow3",
      result: () => {
        asked();
        return new Promise(() => {}); // never answers
      },
    });
    const pending = invoke(c.a1, "AskClient", slow.id);
    await askedPromise;
    await slow.conn.stop();
    eq(await pending, "error: Connection disconnected.", "AskClient of a remote client that disconnected");
  });

  await stopAll(all);
});
