"""Load options: what a request asks for, what a model runs with, and when
a difference means a reload.

A request's absent field means "no opinion" (DESIGN.md item 2): it keeps the
running model's value, or the catalog default when starting, so a bare
`Load M` never reloads.
"""

from __future__ import annotations

from dataclasses import dataclass

from lemonade_grpc.pool.errors import InvalidOptions

# Arguments the control plane owns: a backend started with another port,
# host, model or key would be unreachable or serve the wrong model.
RESERVED_BACKEND_ARGS = frozenset(
    {
        "--port",
        "--host",
        "-m",
        "--model",
        "-mu",
        "--model-url",
        "-hf",
        "-hfr",
        "--hf-repo",
        "-hff",
        "--hf-file",
        "--api-key",
        "--api-key-file",
        "--ssl-key-file",
        "--ssl-cert-file",
        "-c",
        "--ctx-size",
        "--path",
        "--api-prefix",
    }
)
MAX_CTX_SIZE = 1 << 24


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
    whoever schedules idle unloads; it is kept apart so that changing the
    server default changes models loaded without an override.
    """

    ctx_size: int
    idle_unload_seconds: int | None
    backend_args: tuple[str, ...]

    def process_key(self) -> tuple[int, tuple[str, ...]]:
        """The part of the options baked into the process: a change means a reload."""
        return (self.ctx_size, self.backend_args)


def validate(requested: RequestedOptions) -> None:
    """Raise `InvalidOptions` naming the field if `requested` cannot be honoured."""
    if requested.ctx_size is not None and not 1 <= requested.ctx_size <= MAX_CTX_SIZE:
        raise InvalidOptions(
            f"ctx_size must be in 1..{MAX_CTX_SIZE}, got {requested.ctx_size}",
            field="options.ctx_size",
        )
    if requested.idle_unload_seconds is not None and requested.idle_unload_seconds < 0:
        raise InvalidOptions(
            f"idle_unload_seconds must be >= 0 (0 = never), got {requested.idle_unload_seconds}",
            field="options.idle_unload_seconds",
        )
    for arg in requested.backend_args or ():
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_BACKEND_ARGS:
            raise InvalidOptions(
                f"backend argument {flag} is set by lemonade-grpc and cannot be overridden"
                " (use options.ctx_size for the context size)",
                field="options.backend_args.args",
            )
        if "\0" in arg:
            raise InvalidOptions("backend arguments cannot contain NUL", field="options.backend_args.args")


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
