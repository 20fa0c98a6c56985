"""Configuration: one typed object, resolved once, from file, environment and flags.

Precedence: flags > `LEMONADE_GRPC_*` environment variables > the TOML file >
defaults. Every validation error names the field and the value
(`models.tiny.ctx_size: must be an integer >= 1, got -5`).

Environment variables: `LEMONADE_GRPC_CONFIG`, `LEMONADE_GRPC_LISTEN`,
`LEMONADE_GRPC_STATE_DIR`, `LEMONADE_GRPC_IDLE_UNLOAD_SECONDS`, and
`LEMONADE_GRPC_MAX_LOADED_<TYPE>` (e.g. `LEMONADE_GRPC_MAX_LOADED_LLM=2`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lemonade_grpc.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.pool.options import RESERVED_BACKEND_ARGS, EffectiveOptions
from lemonade_grpc.pool.pool import PoolSettings
from lemonade_grpc.provision.paths import default_state_dir

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_MODEL = "tiny"
DEFAULT_CTX_SIZE = 4096
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
    shutdown_grace_seconds: float = 5.0
    source: Path | None = None
    builtin_catalog: bool = False


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values given on the command line; None means not given."""

    config: Path | None = None
    listen: str | None = None
    state_dir: Path | None = None


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
    _only_keys(data, "", {"server", "pool", "models"})
    server = _table(data, "server")
    _only_keys(server, "server.", {"listen", "state_dir", "shutdown_grace_seconds"})
    base_dir = path.parent if path is not None else Path.cwd()

    listen = (
        overrides.listen or env.get(ENV_PREFIX + "LISTEN") or _str(server, "server.listen", DEFAULT_LISTEN)
    )
    _check_listen(listen)
    state_dir_value = overrides.state_dir or _env_path(env, "STATE_DIR")
    if state_dir_value is None and "state_dir" in server:
        state_dir_value = base_dir / _str(server, "server.state_dir", "")
    state_dir = state_dir_value or default_state_dir()

    pool = _pool(_table(data, "pool"), env)
    models_table = _table(data, "models")
    models = {name: _model(name, _table(models_table, name, "models."), base_dir) for name in models_table}
    grace = _number(server, "server.shutdown_grace_seconds", 5.0, minimum=0.0)
    return Config(
        listen=listen,
        state_dir=state_dir,
        pool=pool,
        models=models,
        shutdown_grace_seconds=grace,
        source=path,
        builtin_catalog=not models,
    )


def builtin_catalog(tiny_model: Path) -> dict[str, ModelSpec]:
    """The catalog used when the config defines no models: the bundled tiny model."""
    return {
        DEFAULT_MODEL: ModelSpec(
            name=DEFAULT_MODEL,
            recipe=Recipe.LLAMACPP,
            path=tiny_model,
            type=ModelType.LLM,
            defaults=EffectiveOptions(ctx_size=DEFAULT_CTX_SIZE, idle_unload_seconds=None, backend_args=()),
        )
    }


def _pool(table: Mapping[str, Any], env: Mapping[str, str]) -> PoolSettings:
    _only_keys(
        table,
        "pool.",
        {
            "max_loaded",
            "idle_unload_seconds",
            "health_timeout_seconds",
            "stop_grace_seconds",
            "evict_grace_seconds",
            "memory_reserve_mb",
            "memory_check_seconds",
            "health_check_seconds",
            "health_check_failures",
            "restart_backoff_seconds",
            "restart_backoff_max_seconds",
            "max_restarts",
            "restart_window_seconds",
        },
    )
    max_loaded = {ModelType.LLM: 1, ModelType.EMBEDDING: 1}
    slots = _table(table, "max_loaded", "pool.")
    for key in slots:
        model_type = _model_type(f"pool.max_loaded.{key}", key)
        max_loaded[model_type] = _int(slots, f"pool.max_loaded.{key}", 1, minimum=1)
    for model_type in ModelType:
        env_key = f"{ENV_PREFIX}MAX_LOADED_{model_type.value.upper()}"
        if env_key in env:
            max_loaded[model_type] = _parse_env_int(env_key, env[env_key], minimum=1)
    idle = _int(table, "pool.idle_unload_seconds", 0, minimum=0)
    env_idle = ENV_PREFIX + "IDLE_UNLOAD_SECONDS"
    if env_idle in env:
        idle = _parse_env_int(env_idle, env[env_idle], minimum=0)
    return PoolSettings(
        max_loaded=max_loaded,
        idle_unload_seconds=idle,
        health_timeout_seconds=_number(table, "pool.health_timeout_seconds", 120.0, minimum=0.1),
        stop_grace_seconds=_number(table, "pool.stop_grace_seconds", 5.0, minimum=0.0),
        evict_grace_seconds=_number(table, "pool.evict_grace_seconds", 10.0, minimum=0.0),
        memory_reserve_bytes=_int(table, "pool.memory_reserve_mb", 512, minimum=0) << 20,
        memory_check_seconds=_number(table, "pool.memory_check_seconds", 5.0, minimum=0.0),
        health_check_seconds=_number(table, "pool.health_check_seconds", 5.0, minimum=0.0),
        health_check_failures=_int(table, "pool.health_check_failures", 3, minimum=1),
        restart_backoff_seconds=_number(table, "pool.restart_backoff_seconds", 1.0, minimum=0.0),
        restart_backoff_max_seconds=_number(table, "pool.restart_backoff_max_seconds", 60.0, minimum=0.0),
        max_restarts=_int(table, "pool.max_restarts", 5, minimum=0),
        restart_window_seconds=_number(table, "pool.restart_window_seconds", 600.0, minimum=0.0),
    )


def _model(name: str, table: Mapping[str, Any], base_dir: Path) -> ModelSpec:
    prefix = f"models.{name}."
    _only_keys(
        table, prefix, {"recipe", "path", "type", "ctx_size", "args", "command", "idle_unload_seconds"}
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
    for arg in args:
        if arg.split("=", 1)[0] in RESERVED_BACKEND_ARGS:
            raise ConfigError(prefix + "args", f"{arg!r} is set by lemonade-grpc and cannot be overridden")
    idle_value = table.get("idle_unload_seconds")
    idle = None if idle_value is None else _int(table, prefix + "idle_unload_seconds", 0, minimum=0)
    return ModelSpec(
        name=name,
        recipe=recipe,
        path=path,
        type=_model_type(prefix + "type", _str(table, prefix + "type", ModelType.LLM.value)),
        defaults=EffectiveOptions(
            ctx_size=_int(table, prefix + "ctx_size", DEFAULT_CTX_SIZE, minimum=1),
            idle_unload_seconds=idle,
            backend_args=args,
        ),
        command=command,
    )


def _model_type(field_name: str, value: str) -> ModelType:
    try:
        return ModelType(value)
    except ValueError:
        choices = ", ".join(t.value for t in ModelType)
        raise ConfigError(field_name, f"must be one of {choices}, got {value!r}") from None


def _check_listen(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("server.listen", f"must be HOST:PORT, got {listen!r}")


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


def _int(table: Mapping[str, Any], field_name: str, default: int, *, minimum: int) -> int:
    value = table.get(field_name.rsplit(".", 1)[-1], default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field_name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _number(table: Mapping[str, Any], field_name: str, default: float, *, minimum: float) -> float:
    value = table.get(field_name.rsplit(".", 1)[-1], default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(field_name, f"must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _parse_env_int(name: str, raw: str, *, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {raw!r}")
    return value


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(ENV_PREFIX + name)
    return Path(value) if value else None
