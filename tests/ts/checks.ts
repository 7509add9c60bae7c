// Compile-time checks of the generated clients (tests/test_typescript.py): never run, only type-checked
// with `tsc --strict`; every `@ts-expect-error` line must be an error, or tsc fails.
import type { HubConnection } from "@microsoft/signalr";
import { BlogHub, type BlogHubReceiver, type Post } from "./blog";
import { type ComplexObject, TestHub } from "./interop";
import { KitchenHub, type Renamed } from "./kitchen";

export async function interop(connection: HubConnection): Promise<void> {
  const hub = new TestHub(connection);
  const echoed: string = await hub.echo("text");
  // @ts-expect-error Echo takes a string
  await hub.echo(42);
  // @ts-expect-error Echo takes one argument
  await hub.echo();
  // @ts-expect-error there is no such hub method
  await hub.ech("text");
  // @ts-expect-error Echo returns a string
  const wrong: number = await hub.echo("text");
  const header: string | null = await hub.getHeader("X-Header");
  // @ts-expect-error GetHeader may return null
  const notNull: string = await hub.getHeader("X-Header");
  const complex: ComplexObject = await hub.sendComplexObject();
  const when: string = complex.DateTime; // datetime travels as an ISO 8601 string
  // @ts-expect-error a CustomObject needs Value
  await hub.sendCustomObject({ Name: "x" });
  hub.stream().subscribe({ next: (item: string) => item.length, error: () => {}, complete: () => {} });
  hub.onMessage((text: string) => {
    void text.length;
  });
  // @ts-expect-error a handler of a plain send returns nothing (the JS client would log "Result given")
  hub.onMessage((text: string) => text.length);
  // @ts-expect-error Message carries a string
  hub.onMessage((text: number) => text);
  // @ts-expect-error Result is a client result: the handler must return a number
  hub.onResult(() => "ten");
  hub.register({ message: () => {}, customObject: () => {}, streamCanceled: () => {}, result: async () => 10 });
  // @ts-expect-error a receiver must handle every client method
  hub.register({ message: () => {} });
  void [echoed, wrong, header, notNull, when];
}

export async function blog(connection: HubConnection): Promise<void> {
  const hub = new BlogHub(connection);
  const follows: string[] = await hub.follow("alice");
  const who = await hub.whoAmI();
  const admin: boolean = who.admin;
  // @ts-expect-error WhoAmI has no such field
  who.role;
  const receiver: BlogHubReceiver = {
    postPublished: async (post: Post) => {
      await Promise.resolve(post.title);
    },
    authorPosted: (post: Post) => {
      const published: string | null | undefined = post.publishedAt;
      void published;
    },
    alert: (alert) => {
      void alert.from;
    },
  };
  const off: () => void = hub.register(receiver);
  off();
  void [follows, admin, BlogHub.paths];
}

export async function kitchen(connection: HubConnection): Promise<void> {
  const hub = new KitchenHub(connection);
  await hub.defaults("only the first");
  await hub.defaults("first", 2, null);
  // @ts-expect-error the second argument is a number
  await hub.defaults("first", "2");
  await hub.optional(null, 3);
  // @ts-expect-error the choice is "a", "b" or 3
  await hub.optional(null, "c");
  const colors: ("red" | "green")[] = await hub.enums("green", 2);
  // @ts-expect-error not a Color value
  await hub.enums("blue", 1);
  await hub.objects({ label: "root", children: [{ label: "leaf" }] }, { userName: "u", createdAt: "2000-01-01T00:00:00Z" }, { kind: "sq", side: 2 }, [1, 2]);
  // @ts-expect-error a Struct with rename="camel" is sent with camelCase names
  await hub.objects({ label: "root" }, { user_name: "u", created_at: "" }, { kind: "Circle", radius: 1 }, [1, 2]);
  const renamed: Renamed[] = [];
  hub.generator().subscribe({ next: (item) => renamed.push(item), error: () => {}, complete: () => {} });
  hub.onAskNumber((question: string) => question.length);
  await hub.saySomething("a", "b");
  void colors;
}
