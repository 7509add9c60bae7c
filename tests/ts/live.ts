// The generated TestHub client against a live interop server (tests/test_typescript.py): typed calls,
// a stream each way, typed server-to-client messages and a client result. Prints one JSON line.
import { HttpTransportType, HubConnectionBuilder, type IStreamResult, LogLevel, Subject } from "@microsoft/signalr";
import { type CustomObject, TestHub } from "./interop";

declare const process: { argv: string[]; exitCode?: number };

function collect<T>(stream: IStreamResult<T>): Promise<T[]> {
  return new Promise((resolve, reject) => {
    const items: T[] = [];
    stream.subscribe({ next: (item) => items.push(item), error: reject, complete: () => resolve(items) });
  });
}

function withTimeout<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), 10_000);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main(): Promise<void> {
  const url = process.argv[2];
  const connection = new HubConnectionBuilder()
    .withUrl(`${url}/testhub`, { transport: HttpTransportType.WebSockets })
    .configureLogging(LogLevel.Warning)
    .build();
  const hub = new TestHub(connection);
  let gotMessage!: (text: string) => void;
  let gotCustom!: (obj: CustomObject) => void;
  const message = new Promise<string>((resolve) => (gotMessage = resolve));
  const custom = new Promise<CustomObject>((resolve) => (gotCustom = resolve));
  const offReceiver = hub.register({
    message: (text) => gotMessage(text),
    customObject: (obj) => gotCustom(obj),
    streamCanceled: () => {},
    result: async () => 10,
  });
  let removedCalls = 0;
  const offRemoved = hub.onMessage(() => {
    removedCalls += 1;
  });
  offRemoved();
  await connection.start();
  const result: Record<string, unknown> = {};
  result.echo = await hub.echo("héllo 🙂");
  result.complex = await hub.echoComplexObject({
    String: "s",
    IntArray: [1, 2, 3],
    ByteArray: "AQID",
    Guid: "00010203-0405-0607-0706-050403020100",
    DateTime: "2000-01-01T00:00:00Z",
  });
  result.missingHeader = await hub.getHeader("X-Not-Sent");
  result.stream = await withTimeout(collect(hub.stream()), "Stream");
  const upload = new Subject<string>();
  const concat = hub.streamingConcat(upload);
  upload.next("a");
  upload.next("b");
  upload.complete();
  result.concat = await withTimeout(concat, "StreamingConcat");
  await hub.invokeWithString("to the caller");
  result.message = await withTimeout(message, "Message");
  await hub.sendCustomObject({ Name: "n", Value: 7 });
  result.custom = await withTimeout(custom, "CustomObject");
  const answer = await fetch(`${url}/clientresult/${connection.connectionId}`);
  result.clientResult = await answer.text();
  result.removedCalls = removedCalls;
  offReceiver();
  await connection.stop();
  console.log(JSON.stringify(result));
}

main().catch((error: unknown) => {
  console.log(JSON.stringify({ error: String(error) }));
  process.exitCode = 1;
});
