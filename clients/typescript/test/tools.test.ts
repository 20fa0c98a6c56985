// Assembling streamed tool calls (no server needed).
import assert from "node:assert/strict";
import { test } from "node:test";

import { create } from "@bufbuild/protobuf";

import { ToolCallDeltaSchema, ToolCalls } from "../src/index.js";

test("tool calls assemble from interleaved pieces by index", () => {
  const piece = (index: number, id: string, name: string, args: string) =>
    create(ToolCallDeltaSchema, { index, id, name, arguments: args });
  const calls = new ToolCalls();
  // Two calls whose pieces interleave over several messages, the second call first.
  calls.add([piece(1, "call_1", "get_time", '{"zone"')]);
  calls.add([piece(0, "call_0", "get_weather", '{"ci'), piece(1, "", "", ': "UTC"}')]);
  calls.add([piece(0, "", "", 'ty": "Zürich"}')]);
  assert.deepEqual(
    calls.calls().map((call) => [call.id, call.name, JSON.parse(call.arguments)]),
    [
      ["call_0", "get_weather", { city: "Zürich" }],
      ["call_1", "get_time", { zone: "UTC" }],
    ],
  );
  assert.deepEqual(new ToolCalls().calls(), []);
});
