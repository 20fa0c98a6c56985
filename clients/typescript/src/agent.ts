// A tool call, its result and an answer, on lemonade-grpc's default model
// (`make run`). The model is offered a get_weather tool; one whose chat
// template takes tools calls it (streamed deltas, assembled by ToolCalls),
// and SmolLM2's takes none, so the server refuses the tools
// (CAPABILITY_MISSING) and the agent asks for the call as JSON under a
// schema instead, which the grammar guarantees.
//   npm run agent -- 127.0.0.1:50051 "What is the weather like in Lisbon?"
import type { JsonObject, MessageInitShape } from "@bufbuild/protobuf";

import type { ChatRequestSchema } from "./gen/lemonade/v1/inference_pb.js";
import { connect, errorDetails, ToolCalls, ToolChoiceMode, type ChatMessage } from "./index.js";

const WEATHER: Record<string, string> = { lisbon: "22 °C and sunny", paris: "14 °C and cloudy", london: "11 °C and raining" };
const PARAMETERS: JsonObject = {
  type: "object",
  properties: { city: { type: "string", enum: ["Lisbon", "Paris", "London"] } },
  required: ["city"],
};

const [address = "127.0.0.1:50051", question = "What is the weather like in Lisbon?"] = process.argv.slice(2);
const client = connect(address, { idleConnectionTimeoutMs: 1000 });

/** A streamed reply's text and its tool calls, assembled. */
async function chat(request: MessageInitShape<typeof ChatRequestSchema>) {
  let text = "";
  const calls = new ToolCalls();
  for await (const reply of client.inference.chat(request)) {
    text += reply.text;
    calls.add(reply.toolCalls);
  }
  return { text, calls: calls.calls() };
}

try {
  const user = { role: "user", content: question };
  let how = "tools";
  let callId = "";
  let args: { city: string };
  let calls: ChatMessage["toolCalls"] = [];
  try {
    ({ calls } = await chat({
      model: "smollm2",
      messages: [user],
      tools: [{ name: "get_weather", description: "The current weather in a city", parameters: PARAMETERS }],
      toolChoice: { choice: { case: "mode", value: ToolChoiceMode.REQUIRED } },
    }));
    callId = calls[0].id;
    args = JSON.parse(calls[0].arguments);
  } catch (error) {
    if (errorDetails(error).reason !== "CAPABILITY_MISSING") throw error;
    how = "json-schema";
    const schema: JsonObject = {
      type: "object",
      properties: { tool: { enum: ["get_weather"] }, arguments: PARAMETERS },
      required: ["tool", "arguments"],
      additionalProperties: false,
    };
    const { text } = await chat({
      model: "smollm2",
      temperature: 0,
      maxTokens: 64,
      messages: [{ role: "system", content: "Choose the tool call that answers the user, as JSON." }, user],
      responseFormat: { format: { case: "jsonSchema", value: { schema } } },
    });
    args = JSON.parse(text).arguments;
  }
  const result = WEATHER[args.city.toLowerCase()] ?? "unknown";
  console.log(`question: ${question}\ntool call (${how}): get_weather(${JSON.stringify(args)})\ntool result: ${result}`);
  const messages = callId
    ? [user, { role: "assistant", toolCalls: calls.slice(0, 1) }, { role: "tool", toolCallId: callId, content: result }]
    : [
        { role: "system", content: "You are a helpful assistant." },
        { role: "user", content: `Tool result: the weather in ${args.city} is ${result}. Question: ${question}` },
      ];
  const { text } = await chat({ model: "smollm2", messages, temperature: 0, maxTokens: 48 });
  console.log(`answer: ${text.split(/\s+/).filter(Boolean).join(" ")}`); // one line, whatever the model wrote
} catch (error) {
  const details = errorDetails(error);
  console.error(`${details.code} ${details.reason}: ${details.message}`);
  process.exitCode = 1;
}
