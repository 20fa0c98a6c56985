// Load with progress, watch the pool, stream a completion:
//   npm run example -- 127.0.0.1:50051 tiny "Once upon a time"
import { connect, errorDetails, LoadPhase, watch } from "./index.js";

const [address = "127.0.0.1:50051", model = "tiny", prompt = "Once upon a time"] = process.argv.slice(2);
const client = connect(address);
const stop = new AbortController();

const following = (async () => {
  try {
    for await (const event of watch(client, { signal: stop.signal })) {
      console.error(`event ${event.sequence}: ${event.event.case}`);
    }
  } catch {
    // aborted at the end
  }
})();

try {
  for await (const progress of client.control.load({ model })) {
    console.log(`${LoadPhase[progress.phase]} ${progress.message}`);
  }
  for await (const reply of client.inference.complete({ model, prompt, maxTokens: 32 })) {
    process.stdout.write(reply.text);
  }
  console.log();
} catch (error) {
  const details = errorDetails(error);
  console.error(`${details.code} ${details.reason}: ${details.message}`);
  process.exitCode = 1;
} finally {
  stop.abort();
  await following;
}
