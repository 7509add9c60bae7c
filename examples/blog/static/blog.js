"use strict";
// The blog page: log in (a demo JWT), connect to BlogHub with the official @microsoft/signalr
// bundle (WebSockets, withAutomaticReconnect), show the live feed, followers' notifications and
// (admins only) alerts, plus which instance holds the connection and its state.
// window.blog exposes the state history for the browser tests.

const $ = (id) => document.getElementById(id);
const blog = (window.blog = { states: [], instances: [], connection: null });
let token = sessionStorage.getItem("blog.token");
let me = JSON.parse(sessionStorage.getItem("blog.me") || "null");
let follows = [];

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
}

function setState(state) {
  $("state").textContent = state;
  $("state").className = `badge ${state}`;
  blog.states.push(state);
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(`${response.status} ${data && data.detail ? JSON.stringify(data.detail) : response.statusText}`);
  return data;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "draft";
}

function postItem(post, withFollow) {
  const li = document.createElement("li");
  li.className = "post";
  li.dataset.id = post.id;
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = post.title;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = `#${post.id} by ${post.author}, published ${when(post.publishedAt)} `;
  li.append(title);
  if (post.body) {
    const body = document.createElement("div");
    body.textContent = post.body;
    li.append(body);
  }
  li.append(meta);
  if (withFollow && me && post.author !== me.user) {
    const button = document.createElement("button");
    button.className = "follow";
    button.dataset.author = post.author;
    button.textContent = follows.includes(post.author) ? "following" : `follow ${post.author}`;
    button.addEventListener("click", () => follow(post.author));
    meta.append(button);
  }
  return li;
}

function addPost(post) {
  if (!post.publishedAt) return;
  const existing = $("feed").querySelector(`li[data-id="${post.id}"]`);
  const item = postItem(post, true);
  if (existing) existing.replaceWith(item);
  else {
    const newer = [...$("feed").children].find((li) => Number(li.dataset.id) < post.id);
    $("feed").insertBefore(item, newer || null);
  }
  $("feed-empty").hidden = true;
}

function addAuthorPost(post) {
  if ($("author-feed").querySelector(`li[data-id="${post.id}"]`)) return;
  const li = document.createElement("li");
  li.dataset.id = post.id;
  li.textContent = `${post.author} posted "${post.title}"`;
  $("author-feed").prepend(li);
}

function addAlert(alert) {
  const li = document.createElement("li");
  li.className = "alert";
  li.textContent = `${alert.message} (from ${alert.from} via ${alert.instance})`;
  $("alerts").prepend(li);
}

function showFollows(list) {
  follows = list;
  $("follows").replaceChildren(
    ...list.map((author) => {
      const li = document.createElement("li");
      li.dataset.author = author;
      li.textContent = `${author} `;
      const button = document.createElement("button");
      button.textContent = "unfollow";
      button.addEventListener("click", async () => showFollows(await blog.connection.invoke("Unfollow", author)));
      li.append(button);
      return li;
    }),
  );
  for (const button of $("feed").querySelectorAll("button.follow")) {
    button.textContent = list.includes(button.dataset.author) ? "following" : `follow ${button.dataset.author}`;
  }
}

async function follow(author) {
  showFollows(await blog.connection.invoke("Follow", author));
  log(`following ${author}`);
}

async function loadPosts() {
  for (const post of (await api("GET", "/api/posts")).reverse()) addPost(post);
}

async function showInstance() {
  const info = await blog.connection.invoke("Instance");
  $("instance").textContent = info.name;
  blog.instances.push(info.name);
  log(`connected to ${info.name}`);
  const who = await blog.connection.invoke("WhoAmI");
  showFollows(who.follows);
}

async function connect() {
  const connection = new signalR.HubConnectionBuilder()
    .withUrl("/hubs/blog", { accessTokenFactory: () => token })
    .withAutomaticReconnect()
    .configureLogging(signalR.LogLevel.Warning)
    .build();
  blog.connection = connection;
  connection.on("PostPublished", addPost);
  connection.on("AuthorPosted", addAuthorPost);
  connection.on("Alert", addAlert);
  connection.onreconnecting((err) => {
    setState("reconnecting");
    log(`reconnecting${err ? `: ${err.message || err}` : ""}`);
  });
  connection.onreconnected(async () => {
    setState("connected");
    await showInstance();
    await loadPosts(); // catch up on posts published while we were away
  });
  connection.onclose((err) => {
    setState("disconnected");
    log(`disconnected${err ? `: ${err.message || err}` : ""}`);
  });
  setState("connecting");
  try {
    await connection.start();
  } catch (err) {
    setState("failed");
    log(`could not connect: ${err.message || err}`);
    return;
  }
  setState("connected");
  await showInstance();
}

async function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("reconnect").hidden = false;
  $("logout").hidden = false;
  $("me").textContent = me.admin ? `${me.user} (admin)` : me.user;
  $("admin").hidden = !me.admin;
  await connect();
  await loadPosts();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const result = await api("POST", "/api/login", { user: $("login-user").value.trim(), admin: $("login-admin").checked });
    token = result.token;
    me = { user: result.user, admin: result.admin };
    sessionStorage.setItem("blog.token", token);
    sessionStorage.setItem("blog.me", JSON.stringify(me));
    await start();
  } catch (err) {
    $("login-error").textContent = String(err.message || err);
  }
});

$("post-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const post = await api("POST", "/api/posts", { title: $("post-title").value, body: $("post-body").value });
    await api("POST", `/api/posts/${post.id}/publish`);
    $("post-title").value = "";
    $("post-body").value = "";
    $("post-status").textContent = `published #${post.id}`;
  } catch (err) {
    $("post-status").textContent = String(err.message || err);
  }
});

$("follow-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await follow($("follow-author").value.trim());
    $("follow-author").value = "";
  } catch (err) {
    log(String(err.message || err));
  }
});

$("alert-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await api("POST", "/api/alerts", { message: $("alert-message").value });
    $("alert-message").value = "";
  } catch (err) {
    log(String(err.message || err));
  }
});

$("reconnect").addEventListener("click", async () => {
  await blog.connection.stop();
  await connect();
});

$("logout").addEventListener("click", async () => {
  sessionStorage.clear();
  if (blog.connection) await blog.connection.stop();
  location.reload();
});

if (token && me) start();
