// The TypeScript client against the real server: the repository's venv
// (`make setup`) runs it on a free port with the bundled tiny model.
import assert from "node:assert/strict";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import {
  Code,
  connect,
  DOMAIN,
  errorDetails,
  LoadPhase,
  watch,
  type LemonadeClient,
  type WatchResponse,
} from "../src/index.js";

// dist/test/ -> the repository's root.
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
const PYTHON = join(ROOT, ".venv", "bin", "python");

function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? done(address.port) : fail(new Error("no port"))));
    });
  });
}

interface Server {
  address: string;
  stop(): Promise<void>;
}

async function startServer(port: number, stateDir: string): Promise<Server> {
  const address = `127.0.0.1:${port}`;
  const child: ChildProcess = spawn(
    PYTHON,
    ["-m", "lemonade_grpc", "serve", "--listen", address, "--state-dir", stateDir],
    { stdio: ["ignore", "inherit", "inherit"] },
  );
  const exited = new Promise<number | null>((done) => child.on("exit", (code) => done(code)));
  const client = connect(address, { idleConnectionTimeoutMs: 500 });
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      await client.control.status({}, { timeoutMs: 1000 });
      break;
    } catch (error) {
      if (child.exitCode !== null) throw new Error(`server exited with ${child.exitCode} before serving`);
      if (Date.now() > deadline) throw new Error(`server not serving within 60 s: ${String(error)}`);
      await new Promise((done) => setTimeout(done, 50)); // polling a deadline
    }
  }
  return {
    address,
    async stop() {
      if (child.exitCode !== null) return;
      child.kill("SIGTERM");
      let timer: NodeJS.Timeout | undefined;
      const code = await Promise.race([
        exited,
        new Promise((done) => (timer = setTimeout(() => done("timeout"), 30_000))),
      ]);
      clearTimeout(timer);
      if (code === "timeout") child.kill("SIGKILL");
      assert.equal(code, 0, "the server exits 0 on SIGTERM");
    },
  };
}

async function loadAll(client: LemonadeClient, model: string) {
  const progress = [];
  for await (const message of client.control.load({ model })) progress.push(message);
  return progress;
}

test("load with progress, pin, status, complete, and error reasons", async (t) => {
  const server = await startServer(await freePort(), mkdtempSync(join(tmpdir(), "lemonade-ts-")));
  t.after(() => server.stop());
  const client = connect(server.address, { idleConnectionTimeoutMs: 500 });

  const progress = await loadAll(client, "tiny");
  assert.equal(progress[0].phase, LoadPhase.QUEUED);
  const ready = progress.at(-1)!;
  assert.equal(ready.phase, LoadPhase.READY);
  assert.ok(ready.status!.pid > 0);

  const pinned = await client.control.pin({ model: "tiny", pinned: true });
  assert.equal(pinned.status!.pinned, true);
  const status = await client.control.status({});
  assert.deepEqual(
    status.pool!.models.map((m) => [m.name, m.pinned]),
    [["tiny", true]],
  );

  let tokens = 0;
  let completionTokens = 0;
  for await (const reply of client.inference.complete({ model: "tiny", prompt: "Once", maxTokens: 4, seed: 1 })) {
    tokens += reply.tokenCount;
    completionTokens = reply.usage?.completionTokens ?? completionTokens;
  }
  assert.equal(tokens, 4);
  assert.equal(completionTokens, 4);

  await assert.rejects(client.control.pin({ model: "nope", pinned: true }), (error) => {
    const details = errorDetails(error);
    assert.equal(details.code, Code.NotFound);
    assert.equal(details.reason, "MODEL_NOT_FOUND");
    assert.equal(details.domain, DOMAIN);
    return true;
  });
  await assert.rejects(
    (async () => {
      for await (const _ of client.control.load({
        model: "tiny",
        options: { backendArgs: { args: ["--tools", "all"] } },
      })) {
        // refused before any progress
      }
    })(),
    (error) => {
      const details = errorDetails(error);
      assert.equal(details.reason, "INVALID_OPTIONS");
      assert.deepEqual(details.badFields, ["options.backend_args.args"]);
      assert.match(details.message, /--tools/);
      return true;
    },
  );
});

test("watch resumes across a server restart without repeating an event", async (t) => {
  const port = await freePort();
  const stateDir = mkdtempSync(join(tmpdir(), "lemonade-ts-"));
  const first = await startServer(port, stateDir);
  let second: Server | undefined;
  t.after(async () => {
    await first.stop();
    await second?.stop();
  });
  const client = connect(first.address, { idleConnectionTimeoutMs: 500 });
  const stop = new AbortController();
  const seen: WatchResponse[] = [];
  let arrived: () => void = () => {};
  const following = (async () => {
    try {
      for await (const message of watch(client, { signal: stop.signal })) {
        seen.push(message);
        arrived();
      }
    } catch (error) {
      if (!stop.signal.aborted) throw error;
    }
  })();
  async function waitFor(what: string, match: (m: WatchResponse) => boolean): Promise<WatchResponse> {
    const deadline = Date.now() + 60_000;
    for (let index = 0; ; ) {
      for (; index < seen.length; index++) if (match(seen[index])) return seen[index];
      if (Date.now() > deadline) throw new Error(`no Watch message ${what}; saw ${seen.length}`);
      await new Promise<void>((done) => {
        const timer = setTimeout(done, 1000);
        arrived = () => {
          clearTimeout(timer);
          done();
        };
      });
    }
  }
  const isLoaded = (m: WatchResponse) => m.event.case === "modelLoaded";

  await waitFor("snapshot", (m) => m.event.case === "snapshot");
  await loadAll(client, "tiny");
  const loaded = await waitFor("tiny loaded", isLoaded);
  await first.stop(); // the Watch breaks; it keeps reconnecting
  second = await startServer(port, stateDir);
  const resync = await waitFor("a resync snapshot", (m) => m.resync);
  assert.equal(resync.event.case, "snapshot");
  assert.ok(resync.sequence > loaded.sequence, "the new run numbers above the old one");
  await loadAll(client, "tiny");
  const again = await waitFor("tiny loaded again", (m) => isLoaded(m) && m.sequence > resync.sequence);
  stop.abort();
  await following;

  const sequences = seen.map((m) => m.sequence);
  assert.equal(new Set(sequences).size, sequences.length, "an event was yielded twice");
  const after = seen.filter((m) => m.sequence > resync.sequence).map((m) => m.sequence);
  assert.deepEqual(
    after,
    after.map((_, i) => resync.sequence + 1n + BigInt(i)),
  );
  assert.ok(after.includes(again.sequence));
});

test("the example apps answer from what they retrieved and from their tool's result", async (t) => {
  const server = await startServer(await freePort(), mkdtempSync(join(tmpdir(), "lemonade-ts-")));
  t.after(() => server.stop());
  const run = (example: string) =>
    new Promise<string[]>((done, fail) =>
      execFile("node", [join(ROOT, "clients/typescript/dist/src", example), server.address], (error, out) =>
        error ? fail(error) : done(out.trim().split("\n")),
      ),
    );
  const [question, context, answer] = await run("rag.js");
  assert.equal(question, "question: What is the capital of France?");
  assert.equal(context, "context:  Paris is the capital of France.");
  assert.match(answer, /Paris/);
  const agent = await run("agent.js");
  assert.equal(agent[1], 'tool call (json-schema): get_weather({"city":"Lisbon"})');
  assert.equal(agent[2], "tool result: 22 °C and sunny");
  assert.match(agent[3], /^answer: \S/); // the model's own words (not the same under every load)
});
