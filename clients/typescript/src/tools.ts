/**
 * Assembling the tool calls of a streamed Chat answer from its
 * `ToolCallDelta` pieces: the first piece of a call (by `index`) carries its
 * `id` and `name`, every piece the next part of its `arguments` (JSON text).
 *
 * ```ts
 * const calls = new ToolCalls();
 * for await (const reply of client.inference.chat(request)) calls.add(reply.toolCalls);
 * for (const call of calls.calls()) console.log(call.name, JSON.parse(call.arguments));
 * ```
 */
import { create } from "@bufbuild/protobuf";

import { ToolCallSchema, type ToolCall, type ToolCallDelta } from "./gen/lemonade/v1/inference_pb.js";

export class ToolCalls {
  readonly #byIndex = new Map<number, ToolCall>();

  /** Join `deltas`, in the order they arrived, to the calls they belong to. */
  add(deltas: Iterable<ToolCallDelta>): void {
    for (const delta of deltas) {
      let call = this.#byIndex.get(delta.index);
      if (call === undefined) {
        call = create(ToolCallSchema);
        this.#byIndex.set(delta.index, call);
      }
      call.id ||= delta.id;
      call.name ||= delta.name;
      call.arguments += delta.arguments;
    }
  }

  /**
   * The calls assembled so far, in index order: whole once the stream has
   * ended (FinishReason.TOOL_CALLS). Put them on the assistant message you
   * send back, then answer each with a "tool" message whose `toolCallId` is its `id`.
   */
  calls(): ToolCall[] {
    return [...this.#byIndex.entries()].sort(([a], [b]) => a - b).map(([, call]) => call);
  }
}
