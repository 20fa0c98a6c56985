"""Load options: what a request asks for, what a model runs with, and when
a difference means a reload.

A request's absent field means "no opinion" (DESIGN.md item 2): it keeps the
running model's value, or the catalog default when starting, so a bare
`Load M` never reloads.

Backend arguments come from two places. The operator's (`models.M.args` in
the config) are trusted and always passed. A client's (`options.backend_args`)
are extra arguments, refused unless the operator allowed each flag
(`models.M.allowed_args` or `pool.allowed_args`): an allow-list, never a
deny-list (issue #9 finding 2: a client's `--tools all` gave llama-server a
shell endpoint, `--log-file /any/path` overwrote any file, and an argparse
program takes `--po` for `--port`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lemonade_grpc.core import bounds
from lemonade_grpc.core.errors import InvalidOptions

# "-1" and "-0.5" are values (a negative number), not flags.
_NUMBER = re.compile(r"-\d+(\.\d+)?([eE][-+]?\d+)?")


@dataclass(frozen=True, slots=True)
class RequestedOptions:
    """Options as a request gives them; None means absent."""

    ctx_size: int | None = None
    idle_unload_seconds: int | None = None
    backend_args: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class EffectiveOptions:
    """Options a model actually runs with; every field has a value.

    `idle_unload_seconds` None means "the server's default", resolved by
    `idle_seconds`; it is kept apart so that changing the server default
    changes models loaded without an override. `backend_args` are the
    client's extra arguments only (the operator's are in the catalog).
    """

    ctx_size: int
    idle_unload_seconds: int | None
    backend_args: tuple[str, ...]

    def process_key(self) -> tuple[int, tuple[str, ...]]:
        """The part of the options baked into the process: a change means a reload."""
        return (self.ctx_size, self.backend_args)

    def idle_seconds(self, server_default: int) -> int:
        """Seconds of idleness before an unload (0 = never): this model's own, else the server's."""
        return server_default if self.idle_unload_seconds is None else self.idle_unload_seconds


def flag_of(arg: str) -> str | None:
    """The flag `arg` sets (`--threads` of `--threads=4`), or None when `arg` is a value. Pure."""
    if not arg.startswith("-") or _NUMBER.fullmatch(arg):
        return None
    return arg.split("=", 1)[0]


def validate(requested: RequestedOptions, model: str, allowed_args: frozenset[str]) -> None:
    """Raise `InvalidOptions` naming the field if `requested` cannot be honoured for `model`.

    `allowed_args` are the flags the operator lets clients pass to this
    model. Every range is the one in `lemonade_grpc.core.bounds`.
    """
    if requested.ctx_size is not None and requested.ctx_size not in bounds.CTX_SIZE:
        raise InvalidOptions(
            f"ctx_size must be in {bounds.CTX_SIZE}, got {requested.ctx_size}", field="options.ctx_size"
        )
    idle = requested.idle_unload_seconds
    if idle is not None and idle not in bounds.IDLE_UNLOAD_SECONDS:
        raise InvalidOptions(
            f"idle_unload_seconds must be in {bounds.IDLE_UNLOAD_SECONDS} (0 = never), got {idle}",
            field="options.idle_unload_seconds",
        )
    if requested.backend_args is not None:
        check_client_args(requested.backend_args, model, allowed_args)


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_client_args(args: tuple[str, ...], model: str, allowed_args: frozenset[str]) -> None:
    """Raise `InvalidOptions` unless every flag in `args` is one the operator allowed for `model`.

    A flag is an argument starting with `-` that is not a negative number;
    `--flag=value` is the flag `--flag`. Flags are matched exactly (no
    prefixes). A value must follow a flag. Count and size are bounded.
    """
    field = "options.backend_args.args"
    if len(args) > bounds.BACKEND_ARGS_COUNT:
        raise InvalidOptions(
            f"at most {bounds.BACKEND_ARGS_COUNT} backend arguments are allowed, got {len(args):,}",
            field=field,
        )
    total = 0
    for index, arg in enumerate(args):
        size = len(arg.encode("utf-8", "surrogatepass"))
        total += size
        if size > bounds.BACKEND_ARG_BYTES or total > bounds.BACKEND_ARGS_BYTES:
            raise InvalidOptions(
                f"backend arguments are limited to {bounds.BACKEND_ARG_BYTES} bytes each and"
                f" {bounds.BACKEND_ARGS_BYTES} in all (argument {index} is {size:,} bytes)",
                field=field,
            )
        if "\0" in arg:
            raise InvalidOptions(f"backend argument {index} contains NUL", field=field)
        if not _encodes(arg):  # only a state file can hold one: gRPC strings are UTF-8
            raise InvalidOptions(f"backend argument {index} is not valid UTF-8", field=field)
        flag = flag_of(arg)
        if flag is None:
            if index == 0:
                raise InvalidOptions(
                    f"backend argument {bounds.echo(arg)} is a value with no flag before it", field=field
                )
            continue
        if flag not in allowed_args:
            allowed = ", ".join(sorted(allowed_args)) or "none"
            raise InvalidOptions(
                f"backend flag {bounds.echo(flag)} is not allowed for {model} (allowed: {allowed});"
                f" the operator can allow it with models.{model}.allowed_args or pool.allowed_args"
                " in the config",
                field=field,
            )


def resolve(
    requested: RequestedOptions,
    current: EffectiveOptions | None,
    defaults: EffectiveOptions,
) -> EffectiveOptions:
    """The options a load should end with: each absent field keeps `current`, else `defaults`.

    Pure; does not validate (call `validate` first).
    """
    base = current or defaults
    return EffectiveOptions(
        ctx_size=base.ctx_size if requested.ctx_size is None else requested.ctx_size,
        idle_unload_seconds=(
            base.idle_unload_seconds
            if requested.idle_unload_seconds is None
            else requested.idle_unload_seconds
        ),
        backend_args=base.backend_args if requested.backend_args is None else requested.backend_args,
    )


def requesting(options: EffectiveOptions) -> RequestedOptions:
    """A request for exactly `options` (every field present): how saved pins and restarts ask."""
    return RequestedOptions(options.ctx_size, options.idle_unload_seconds, options.backend_args)
