/**
 * A TypeScript client of lemonade-grpc: the generated protobuf-es messages
 * and services over Connect's gRPC transport (HTTP/2), a failed call's
 * details, and a Watch that outlives restarts.
 *
 * ```ts
 * const client = connect("127.0.0.1:50051");
 * for await (const progress of client.control.load({ model: "tiny" })) console.log(progress.phase);
 * for await (const event of watch(client)) console.log(event.sequence, event.event.case);
 * ```
 */
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { Inference } from "./gen/lemonade/v1/inference_pb.js";
import { ModelControl, type WatchResponse } from "./gen/lemonade/v1/model_control_pb.js";

export * from "./gen/lemonade/v1/inference_pb.js";
export * from "./gen/lemonade/v1/model_control_pb.js";
export { Code, ConnectError };
export { ToolCalls } from "./tools.js";

/** The ErrorInfo domain of every error the server reports. */
export const DOMAIN = "lemonade.v1";

/** Reconnection waits of `watch`, in ms: doubling from the first to the second. */
export const RECONNECT_MS = [100, 2000] as const;

export interface LemonadeClient {
  control: Client<typeof ModelControl>;
  inference: Client<typeof Inference>;
}

/**
 * A client of the server at `address` (HOST:PORT, plaintext HTTP/2).
 * `idleConnectionTimeoutMs` closes the connection once idle that long (the
 * transport's default keeps it, and with it the process, for 15 minutes).
 */
export function connect(address: string, options: { idleConnectionTimeoutMs?: number } = {}): LemonadeClient {
  const transport = createGrpcTransport({ baseUrl: `http://${address}`, ...options });
  return { control: createClient(ModelControl, transport), inference: createClient(Inference, transport) };
}

/**
 * What a failed call says: its code and message, the ErrorInfo reason
 * (MODEL_NOT_FOUND, SLOTS_PINNED, ...) and the request fields a BadRequest
 * names. `reason` is "" for errors gRPC itself produced.
 */
export interface ErrorDetails {
  code: Code;
  message: string;
  reason: string;
  domain: string;
  metadata: Record<string, string>;
  badFields: string[];
}

/** The details of `error`, thrown by a call. */
export function errorDetails(error: unknown): ErrorDetails {
  const failure = ConnectError.from(error);
  const details: ErrorDetails = {
    code: failure.code,
    message: failure.rawMessage,
    reason: "",
    domain: "",
    metadata: {},
    badFields: [],
  };
  for (const detail of failure.details) {
    if (!("type" in detail)) continue; // one of ours, not received
    if (detail.type === "google.rpc.ErrorInfo") {
      Object.assign(details, readErrorInfo(detail.value));
    } else if (detail.type === "google.rpc.BadRequest") {
      details.badFields.push(...readBadRequest(detail.value));
    }
  }
  return details;
}

// google.rpc.ErrorInfo and BadRequest, read field by field: two small
// messages are not worth generating googleapis for.
function readErrorInfo(bytes: Uint8Array): Pick<ErrorDetails, "reason" | "domain" | "metadata"> {
  const found = { reason: "", domain: "", metadata: {} as Record<string, string> };
  fields(bytes, (field, reader, wireType) => {
    if (field === 1) found.reason = reader.string();
    else if (field === 2) found.domain = reader.string();
    else if (field === 3) {
      let key = "";
      let value = "";
      fields(reader.bytes(), (entryField, entry, entryType) => {
        if (entryField === 1) key = entry.string();
        else if (entryField === 2) value = entry.string();
        else entry.skip(entryType);
      });
      found.metadata[key] = value;
    } else reader.skip(wireType);
  });
  return found;
}

function readBadRequest(bytes: Uint8Array): string[] {
  const names: string[] = [];
  fields(bytes, (field, reader, wireType) => {
    if (field !== 1) return void reader.skip(wireType);
    fields(reader.bytes(), (violationField, violation, violationType) => {
      if (violationField === 1) names.push(violation.string());
      else violation.skip(violationType);
    });
  });
  return names;
}

function fields(bytes: Uint8Array, each: (field: number, reader: BinaryReader, wireType: WireType) => void): void {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    each(field, reader, wireType);
  }
}

/**
 * The pool's events, across disconnections and server restarts.
 *
 * Without `since`, a snapshot first; with it, the events after that
 * sequence. When the stream breaks (UNAVAILABLE: the server stopped,
 * restarted, or the connection dropped) it reconnects with the last
 * sequence it saw: the server replays what was missed or, when it cannot
 * (another run of the server, or too far behind), sends a snapshot with
 * `resync` set first. No event is yielded twice. Any other error is thrown;
 * `signal` ends it.
 */
export async function* watch(
  client: LemonadeClient,
  options: { since?: bigint; signal?: AbortSignal } = {},
): AsyncGenerator<WatchResponse> {
  let last = options.since;
  let wait: number = RECONNECT_MS[0];
  for (;;) {
    try {
      const request = last === undefined ? {} : { sinceSequence: last };
      for await (const message of client.control.watch(request, { signal: options.signal })) {
        wait = RECONNECT_MS[0];
        if (message.event.case !== "snapshot" && last !== undefined && message.sequence <= last) {
          continue; // seen before the reconnection
        }
        last = message.sequence;
        yield message;
      }
    } catch (error) {
      if (options.signal?.aborted || ConnectError.from(error).code !== Code.Unavailable) throw error;
    }
    if (options.signal?.aborted) return;
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, RECONNECT_MS[1]);
  }
}
