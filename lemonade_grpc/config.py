"""Configuration: one typed object, resolved once, from file, environment and flags.

Precedence: flags > `LEMONADE_GRPC_*` environment variables > the TOML file >
defaults. Every validation error names the field and the value
(`models.tiny.ctx_size: must be an integer >= 1, got -5`).

Environment variables: `LEMONADE_GRPC_CONFIG`, `LEMONADE_GRPC_LISTEN`,
`LEMONADE_GRPC_STATE_DIR`, `LEMONADE_GRPC_IDLE_UNLOAD_SECONDS`,
`LEMONADE_GRPC_PROMETHEUS_LISTEN`, `LEMONADE_GRPC_LOG_FORMAT`, and
`LEMONADE_GRPC_MAX_LOADED_<TYPE>` (e.g. `LEMONADE_GRPC_MAX_LOADED_LLM=2`).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lemonade_grpc.backends import llama_flags
from lemonade_grpc.core import access, bounds
from lemonade_grpc.core import options as opts
from lemonade_grpc.core.access import Tokens
from lemonade_grpc.core.catalog import POOLINGS, ModelSpec, ModelType, Recipe
from lemonade_grpc.core.gguf import read_metadata
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.core.settings import (
    LOG_FORMATS,
    BackendLogSettings,
    Limits,
    LogFormat,
    PoolSettings,
    TelemetrySettings,
    TLSFiles,
)
from lemonade_grpc.provision.paths import default_state_dir

DEFAULT_LISTEN = "127.0.0.1:50051"
# The built-in catalog's models (`builtin_catalog`).
TINY_MODEL = "tiny"
CHAT_MODEL = "smollm2"
EMBEDDING_MODEL = "smollm2-embed"
EMBEDDING_CTX_SIZE = 2048
DEFAULT_POOLING = "last"  # an embedding model's whose GGUF names none (`_pooling`)
DEFAULT_CTX_SIZE = 4096
DEFAULT_SHUTDOWN_GRACE_SECONDS = 5.0
ENV_PREFIX = "LEMONADE_GRPC_"
COMMAND_PLACEHOLDERS = frozenset({"port", "path", "ctx_size"})


class ConfigError(ValueError):
    """A configuration value is wrong. `field` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `serve` needs, resolved."""

    listen: str
    state_dir: Path
    pool: PoolSettings
    models: Mapping[str, ModelSpec]
    limits: Limits = field(default_factory=Limits)
    shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS
    source: Path | None = None
    builtin_catalog: bool = False
    tokens: Tokens = field(default_factory=Tokens)
    tls: TLSFiles | None = None
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    backend_logs: BackendLogSettings = field(default_factory=BackendLogSettings)


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values given on the command line; None means not given."""

    config: Path | None = None
    listen: str | None = None
    state_dir: Path | None = None
    insecure_allow_remote: bool = False
    log_format: LogFormat | None = None


def load(overrides: Overrides, env: Mapping[str, str] | None = None) -> Config:
    """Resolve the configuration. Raises `ConfigError` naming the bad field.

    Reads the config file (if any) and checks that model files exist; does
    not generate the bundled model (that is `serve`'s job at start-up).
    """
    env = os.environ if env is None else env
    path = overrides.config or _env_path(env, "CONFIG")
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError("config", f"file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError("config", f"{path} is not valid TOML: {error}") from None
    _only_keys(data, "", {"server", "pool", "limits", "models", "auth", "tls", "telemetry", "backend_logs"})
    server = _table(data, "server")
    _only_keys(server, "server.", {"listen", "state_dir", "shutdown_grace_seconds"})
    base_dir = path.parent if path is not None else Path.cwd()

    listen = (
        overrides.listen or env.get(ENV_PREFIX + "LISTEN") or _str(server, "server.listen", DEFAULT_LISTEN)
    )
    _check_listen(listen)
    tokens = _tokens(_table(data, "auth"), env, base_dir)
    tls = _tls(_table(data, "tls"), base_dir)
    # Client certificates (mutual TLS) authenticate clients as tokens do.
    authenticated = tokens.enabled or (tls is not None and tls.client_ca_file is not None)
    if not authenticated and not overrides.insecure_allow_remote and not _is_loopback(listen):
        raise ConfigError(
            "server.listen",
            f"{listen} is reachable from other hosts and no token is configured ([auth]): anyone there"
            " could load, unload and run models. Configure tokens, listen on loopback, or pass"
            " --insecure-allow-remote",
        )
    state_dir_value = overrides.state_dir or _env_path(env, "STATE_DIR")
    if state_dir_value is None and "state_dir" in server:
        state_dir_value = base_dir / _str(server, "server.state_dir", "")
    state_dir = state_dir_value or default_state_dir()

    pool, pool_allowed = _pool(_table(data, "pool"), env)
    models_table = _table(data, "models")
    models = {
        name: _model(name, _table(models_table, name, "models."), base_dir, pool_allowed)
        for name in models_table
    }
    grace = _number(
        server, "server.shutdown_grace_seconds", DEFAULT_SHUTDOWN_GRACE_SECONDS, bounds.GRACE_SECONDS, float
    )
    return Config(
        listen=listen,
        state_dir=state_dir,
        pool=pool,
        models=models,
        limits=_limits(_table(data, "limits")),
        shutdown_grace_seconds=grace,
        source=path,
        builtin_catalog=not models,
        tokens=tokens,
        tls=tls,
        telemetry=_telemetry(_table(data, "telemetry"), env, overrides.log_format),
        backend_logs=_backend_logs(_table(data, "backend_logs")),
    )


def reload_tokens(config: Config, env: Mapping[str, str] | None = None) -> Tokens:
    """The tokens `config`'s sources hold now: its file's `[auth]` and the token variables.

    What SIGHUP re-reads (issue 18 finding 1): tokens rotate without a
    restart. Nothing else of the file is read again. Raises `ConfigError`
    naming the field, as at start-up.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if config.source is not None:
        try:
            with config.source.open("rb") as handle:
                data = tomllib.load(handle)
        except OSError as error:
            raise ConfigError("config", f"cannot read {config.source}: {error}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError("config", f"{config.source} is not valid TOML: {error}") from None
    base_dir = config.source.parent if config.source is not None else Path.cwd()
    return _tokens(_table(data, "auth"), env, base_dir)


def builtin_catalog(tiny_model: Path, smollm2: Path | None) -> dict[str, ModelSpec]:
    """The catalog used when the config defines no models.

    The default model, SmolLM2-135M-Instruct (`smollm2`: None when it could
    not be fetched), twice: as a chat model and as an embedding model
    (issue 19: a newcomer's first chat reads as English, and Embed has a
    model); and the generated tiny model (random weights: fast, and noise).
    """
    catalog = {TINY_MODEL: _builtin(TINY_MODEL, tiny_model, ModelType.LLM, DEFAULT_CTX_SIZE)}
    if smollm2 is not None:
        catalog[CHAT_MODEL] = _builtin(CHAT_MODEL, smollm2, ModelType.LLM, DEFAULT_CTX_SIZE)
        catalog[EMBEDDING_MODEL] = _builtin(
            EMBEDDING_MODEL, smollm2, ModelType.EMBEDDING, EMBEDDING_CTX_SIZE, DEFAULT_POOLING
        )
    return catalog


def _builtin(
    name: str, path: Path, model_type: ModelType, ctx_size: int, pooling: str | None = None
) -> ModelSpec:
    return ModelSpec(
        name=name,
        recipe=Recipe.LLAMACPP,
        path=path,
        type=model_type,
        defaults=EffectiveOptions(ctx_size=ctx_size, idle_unload_seconds=None, backend_args=()),
        pooling=pooling,
    )


# Each numeric field of [pool] and [limits]: its range and whether it must be
# a whole number. Defaults are the dataclasses' (PoolSettings, Limits).
_POOL_NUMBERS: dict[str, tuple[bounds.Range, type]] = {
    "idle_unload_seconds": (bounds.IDLE_UNLOAD_SECONDS, int),
    "health_timeout_seconds": (bounds.HEALTH_TIMEOUT_SECONDS, float),
    "stop_grace_seconds": (bounds.GRACE_SECONDS, float),
    "evict_grace_seconds": (bounds.GRACE_SECONDS, float),
    "memory_reserve_mb": (bounds.MEMORY_RESERVE_MB, int),
    "memory_check_seconds": (bounds.CHECK_SECONDS, float),
    "health_check_seconds": (bounds.CHECK_SECONDS, float),
    "health_check_timeout_seconds": (bounds.HEALTH_CHECK_TIMEOUT_SECONDS, float),
    "idle_health_check_seconds": (bounds.CHECK_SECONDS, float),
    "health_check_failures": (bounds.HEALTH_CHECK_FAILURES, int),
    "restart_backoff_seconds": (bounds.BACKOFF_SECONDS, float),
    "restart_backoff_max_seconds": (bounds.BACKOFF_SECONDS, float),
    "max_restarts": (bounds.MAX_RESTARTS, int),
    "restart_window_seconds": (bounds.RESTART_WINDOW_SECONDS, float),
    "progress_seconds": (bounds.PROGRESS_SECONDS, float),
}
_LIMITS_NUMBERS: dict[str, tuple[bounds.Range, type]] = {
    "max_streams": (bounds.MAX_STREAMS, int),
    "max_streams_per_model": (bounds.MAX_STREAMS, int),
    "max_queued_streams": (bounds.MAX_QUEUED_STREAMS, int),
    "max_queued_loads": (bounds.MAX_QUEUED_LOADS, int),
    "watch_queue_events": (bounds.WATCH_QUEUE_EVENTS, int),
    "max_watch_streams": (bounds.MAX_WATCH_STREAMS, int),
    "max_health_watch_streams": (bounds.MAX_WATCH_STREAMS, int),
    "max_connections": (bounds.MAX_CONNECTIONS, int),
    "handshake_timeout_seconds": (bounds.HANDSHAKE_TIMEOUT_SECONDS, float),
    "stream_interval_ms": (bounds.STREAM_INTERVAL_MS, float),
}


def _pool(table: Mapping[str, Any], env: Mapping[str, str]) -> tuple[PoolSettings, frozenset[str]]:
    """The [pool] table: its settings, and the backend flags every model lets clients pass."""
    _only_keys(table, "pool.", {"max_loaded", "allowed_args", *_POOL_NUMBERS})
    defaults = PoolSettings()
    max_loaded = dict(defaults.max_loaded)
    slots = _table(table, "max_loaded", "pool.")
    for key in slots:
        model_type = _model_type(f"pool.max_loaded.{key}", key)
        max_loaded[model_type] = int(_number(slots, f"pool.max_loaded.{key}", 1, bounds.MAX_LOADED, int))
    for model_type in ModelType:
        env_key = f"{ENV_PREFIX}MAX_LOADED_{model_type.value.upper()}"
        if env_key in env:
            max_loaded[model_type] = _parse_env_int(env_key, env[env_key], bounds.MAX_LOADED)
    values: dict[str, Any] = {
        key: _number(table, f"pool.{key}", getattr(defaults, key), valid, kind)
        for key, (valid, kind) in _POOL_NUMBERS.items()
    }
    env_idle = ENV_PREFIX + "IDLE_UNLOAD_SECONDS"
    if env_idle in env:
        values["idle_unload_seconds"] = _parse_env_int(env_idle, env[env_idle], bounds.IDLE_UNLOAD_SECONDS)
    allowed = _allowed_args(table, "pool.allowed_args", Recipe.LLAMACPP)
    return PoolSettings(max_loaded=max_loaded, **values), allowed


Settings = TypeVar("Settings", Limits, BackendLogSettings)


def _numbers_table(
    table: Mapping[str, Any],
    name: str,
    numbers: Mapping[str, tuple[bounds.Range, type]],
    kind: type[Settings],
) -> Settings:
    """A table of numbers only (`[limits]`, `[backend_logs]`): each checked against its range."""
    _only_keys(table, f"{name}.", set(numbers))
    defaults = kind()
    values = {
        key: _number(table, f"{name}.{key}", getattr(defaults, key), valid, number_type)
        for key, (valid, number_type) in numbers.items()
    }
    return kind(**values)


def _limits(table: Mapping[str, Any]) -> Limits:
    return _numbers_table(table, "limits", _LIMITS_NUMBERS, Limits)


_BACKEND_LOG_NUMBERS: dict[str, tuple[bounds.Range, type]] = {
    "max_file_mb": (bounds.LOG_FILE_MB, int),
    "max_total_mb": (bounds.LOG_TOTAL_MB, int),
    "min_free_mb": (bounds.LOG_MIN_FREE_MB, int),
}


def _backend_logs(table: Mapping[str, Any]) -> BackendLogSettings:
    """[backend_logs]: how much disk the backends' logs may take (issue 18 finding 6)."""
    return _numbers_table(table, "backend_logs", _BACKEND_LOG_NUMBERS, BackendLogSettings)


def _allowed_args(table: Mapping[str, Any], field_name: str, recipe: Recipe) -> frozenset[str]:
    """Flags clients may pass (`allowed_args`): each a flag, never one lemonade-grpc owns."""
    flags = _str_list(table, field_name)
    for flag in flags:
        if opts.flag_of(flag) != flag:
            raise ConfigError(field_name, f"{flag!r} is not a flag (like --threads): list flags, not values")
        if recipe is Recipe.LLAMACPP and llama_flags.is_reserved(flag):
            raise ConfigError(field_name, f"{flag!r} is set by lemonade-grpc and cannot be allowed")
    return frozenset(flags)


def _model(name: str, table: Mapping[str, Any], base_dir: Path, pool_allowed: frozenset[str]) -> ModelSpec:
    prefix = f"models.{name}."
    problem = bounds.model_name_problem(name)
    if problem is not None:
        raise ConfigError(f"models.{bounds.echo(name)}", f"the model name {problem}")
    _only_keys(
        table,
        prefix,
        {
            *("recipe", "path", "type", "ctx_size", "args", "allowed_args", "command"),
            *("idle_unload_seconds", "pooling", "mmproj"),
        },
    )
    recipe_name = _str(table, prefix + "recipe", Recipe.LLAMACPP.value)
    try:
        recipe = Recipe(recipe_name)
    except ValueError:
        choices = ", ".join(r.value for r in Recipe)
        raise ConfigError(prefix + "recipe", f"must be one of {choices}, got {recipe_name!r}") from None
    if "path" not in table:
        raise ConfigError(prefix + "path", "is required")
    path = base_dir / _str(table, prefix + "path", "")
    if not path.exists():
        raise ConfigError(prefix + "path", f"{path} does not exist")
    command: tuple[str, ...] = ()
    if recipe is Recipe.COMMAND:
        command = _str_list(table, prefix + "command", required=True)
        for part in command:
            try:
                part.format_map({key: "" for key in COMMAND_PLACEHOLDERS})
            except (KeyError, ValueError, IndexError) as error:
                raise ConfigError(
                    prefix + "command",
                    f"bad placeholder in {part!r} ({error}); known: "
                    + ", ".join("{" + p + "}" for p in sorted(COMMAND_PLACEHOLDERS)),
                ) from None
        if not any("{port}" in part for part in command):
            raise ConfigError(prefix + "command", "must contain {port}: the backend has to listen where told")
    elif "command" in table:
        raise ConfigError(prefix + "command", 'is only for recipe = "command"')
    args = _str_list(table, prefix + "args")
    if recipe is Recipe.LLAMACPP:
        for arg in args:
            if llama_flags.is_reserved(opts.flag_of(arg)):
                raise ConfigError(
                    prefix + "args", f"{arg!r} is set by lemonade-grpc and cannot be overridden"
                )
    allowed = _allowed_args(table, prefix + "allowed_args", recipe)
    if recipe is Recipe.LLAMACPP:
        pool_allowed = frozenset(flag for flag in pool_allowed if not llama_flags.is_reserved(flag))
    idle_value = table.get("idle_unload_seconds")
    idle = (
        None
        if idle_value is None
        else int(_number(table, prefix + "idle_unload_seconds", 0, bounds.IDLE_UNLOAD_SECONDS, int))
    )
    model_type = _model_type(prefix + "type", _str(table, prefix + "type", ModelType.LLM.value))
    return ModelSpec(
        name=name,
        recipe=recipe,
        path=path,
        type=model_type,
        pooling=_pooling(table, prefix, model_type, recipe, path),
        mmproj=_mmproj(table, prefix, recipe, base_dir),
        defaults=EffectiveOptions(
            ctx_size=int(_number(table, prefix + "ctx_size", DEFAULT_CTX_SIZE, bounds.CTX_SIZE, int)),
            idle_unload_seconds=idle,
            backend_args=(),
        ),
        command=command,
        args=args,
        allowed_args=allowed | pool_allowed,
    )


def _pooling(
    table: Mapping[str, Any], prefix: str, model_type: ModelType, recipe: Recipe, path: Path
) -> str | None:
    """`pooling` of an embedding model run by llama-server: the catalog's, else the GGUF's own, else last.

    None leaves it to the model (its GGUF names a pooling). Where it names
    none, as for a chat model's GGUF served to embed (llama-server refuses
    OpenAI embeddings without a pooling), the last token's vector: a causal
    model's last token has read the whole text. Measured on SmolLM2 (five
    documents, seven queries, cosine): last ranked 7 of 7 right, mean 4, cls 1.
    """
    if "pooling" in table and (model_type is not ModelType.EMBEDDING or recipe is not Recipe.LLAMACPP):
        raise ConfigError(prefix + "pooling", 'is only for type = "embedding" with recipe = "llamacpp"')
    if model_type is not ModelType.EMBEDDING or recipe is not Recipe.LLAMACPP:
        return None
    if "pooling" in table:
        value = _str(table, prefix + "pooling", "")
        if value not in POOLINGS:
            raise ConfigError(prefix + "pooling", f"must be one of {', '.join(POOLINGS)}, got {value!r}")
        return value
    try:
        fields = read_metadata(path, wanted=lambda key: key.endswith(".pooling_type"))
    except (OSError, ValueError):
        return DEFAULT_POOLING  # not a GGUF we can read: llama-server will say what it thinks of it
    named = [value for value in fields.values() if type(value) is int and value > 0]
    return None if named else DEFAULT_POOLING


def _mmproj(table: Mapping[str, Any], prefix: str, recipe: Recipe, base_dir: Path) -> Path | None:
    """A vision model's projector file (llama-server's `--mmproj`), relative to the config file."""
    if "mmproj" not in table:
        return None
    if recipe is not Recipe.LLAMACPP:
        raise ConfigError(prefix + "mmproj", 'is only for recipe = "llamacpp"')
    path = base_dir / _str(table, prefix + "mmproj", "")
    if not path.is_file():
        raise ConfigError(prefix + "mmproj", f"{path} is not a file")
    return path


def _model_type(field_name: str, value: str) -> ModelType:
    try:
        return ModelType(value)
    except ValueError:
        choices = ", ".join(t.value for t in ModelType)
        raise ConfigError(field_name, f"must be one of {choices}, got {value!r}") from None


def _tokens(table: Mapping[str, Any], env: Mapping[str, str], base_dir: Path) -> Tokens:
    """[auth]: `admin_token_file`, `inference_token_file` (one token per line), and the
    LEMONADE_GRPC_ADMIN_TOKEN / LEMONADE_GRPC_INFERENCE_TOKEN variables. Never flags."""
    _only_keys(table, "auth.", {"admin_token_file", "inference_token_file"})
    found: dict[str, tuple[bytes, ...]] = {}
    for role in ("admin", "inference"):
        key = f"auth.{role}_token_file"
        tokens: list[str] = []
        if f"{role}_token_file" in table:
            token_file = base_dir / _str(table, key, "")
            try:
                tokens.extend(access.parse_tokens(token_file.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(key, f"cannot read {token_file}: {error}") from None
        variable = f"{ENV_PREFIX}{role.upper()}_TOKEN"
        if env.get(variable):
            tokens.append(env[variable].strip())
        for token in tokens:
            if len(token) < access.MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
                where = key if f"{role}_token_file" in table else variable
                # Never the token itself: it would land in logs.
                raise ConfigError(
                    where,
                    f"a token must be at least {access.MIN_TOKEN_LENGTH} printable characters, no spaces",
                )
        found[role] = tuple(token.encode() for token in tokens)
    return Tokens(admin=found["admin"], inference=found["inference"])


def _tls(table: Mapping[str, Any], base_dir: Path) -> TLSFiles | None:
    """[tls]: `cert_file` and `key_file` (PEM), and `client_ca_file` for mutual TLS; absent: plaintext."""
    _only_keys(table, "tls.", {"cert_file", "key_file", "client_ca_file"})
    if not table:
        return None
    files: dict[str, Path] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        if key not in table:
            if key != "client_ca_file":
                raise ConfigError(f"tls.{key}", "is required when [tls] is present")
            continue
        file = base_dir / _str(table, f"tls.{key}", "")
        if not file.is_file():
            raise ConfigError(f"tls.{key}", f"{file} is not a readable file")
        files[key] = file
    return TLSFiles(files["cert_file"], files["key_file"], files.get("client_ca_file"))


def _telemetry(
    table: Mapping[str, Any], env: Mapping[str, str], log_format: LogFormat | None
) -> TelemetrySettings:
    """[telemetry]: `prometheus_listen` (HOST:PORT, off when absent) and `log_format` (plain or json)."""
    _only_keys(table, "telemetry.", {"prometheus_listen", "log_format"})
    prometheus = env.get(ENV_PREFIX + "PROMETHEUS_LISTEN") or table.get("prometheus_listen")
    if prometheus is not None:
        if not isinstance(prometheus, str):
            raise ConfigError("telemetry.prometheus_listen", f"must be HOST:PORT, got {prometheus!r}")
        _check_listen(prometheus, "telemetry.prometheus_listen")
    chosen = log_format or env.get(ENV_PREFIX + "LOG_FORMAT") or _str(table, "telemetry.log_format", "plain")
    if chosen not in LOG_FORMATS:
        raise ConfigError("telemetry.log_format", f"must be one of {', '.join(LOG_FORMATS)}, got {chosen!r}")
    return TelemetrySettings(prometheus_listen=prometheus, log_format=chosen)


def _is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _check_listen(listen: str, field_name: str = "server.listen") -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(field_name, f"must be HOST:PORT, got {listen!r}")


def _only_keys(table: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(prefix + key, f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _table(table: Mapping[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(prefix + key, f"must be a table, got {value!r}")
    return value


def _str(table: Mapping[str, Any], field_name: str, default: str) -> str:
    value = table.get(field_name.rsplit(".", 1)[-1], default)
    if not isinstance(value, str):
        raise ConfigError(field_name, f"must be a string, got {value!r}")
    return value


def _str_list(table: Mapping[str, Any], field_name: str, *, required: bool = False) -> tuple[str, ...]:
    key = field_name.rsplit(".", 1)[-1]
    if key not in table:
        if required:
            raise ConfigError(field_name, "is required")
        return ()
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (required and not value):
        raise ConfigError(
            field_name, f"must be a {'non-empty ' if required else ''}list of strings, got {value!r}"
        )
    return tuple(value)


def _number(
    table: Mapping[str, Any], field_name: str, default: float, valid: bounds.Range, kind: type
) -> Any:
    """The number at `field_name` (its last part is the key in `table`), checked against `valid`."""
    value = table.get(field_name.rsplit(".", 1)[-1], default)
    whole = kind is int
    if (whole and not isinstance(value, int)) or value not in valid:
        what = "an integer" if whole else "a number"
        raise ConfigError(field_name, f"must be {what} in {valid}, got {value!r}")
    return int(value) if whole else float(value)


def _parse_env_int(name: str, raw: str, valid: bounds.Range) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer in {valid}, got {raw!r}") from None
    if value not in valid:
        raise ConfigError(name, f"must be an integer in {valid}, got {raw!r}")
    return value


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(ENV_PREFIX + name)
    return Path(value) if value else None
