"""Config resolution: file < environment < flags, errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lemonade_grpc.backends.recipes import backend_argv, embedding_args
from lemonade_grpc.config import ConfigError, Overrides, load
from lemonade_grpc.core.catalog import ModelType, Recipe
from lemonade_grpc.provision.tiny_model import ensure_tiny_model


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file_use_the_builtin_catalog(tmp_path: Path) -> None:
    config = load(Overrides(state_dir=tmp_path), env={})
    assert config.listen == "127.0.0.1:50051"
    assert config.builtin_catalog
    assert not config.models
    assert config.pool.max_loaded == {ModelType.LLM: 1, ModelType.EMBEDDING: 1}


def test_file_values_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
listen = "127.0.0.1:6000"
[pool]
max_loaded = { llm = 2 }
idle_unload_seconds = 30
[models.a]
path = "m.gguf"
ctx_size = 512
args = ["--threads", "1"]
[models.b]
recipe = "command"
path = "m.gguf"
type = "embedding"
command = ["srv", "--port", "{port}", "--model", "{path}"]
""",
    )
    config = load(Overrides(config=path), env={})
    assert config.listen == "127.0.0.1:6000"
    assert config.pool.max_loaded[ModelType.LLM] == 2
    assert config.pool.idle_unload_seconds == 30
    a, b = config.models["a"], config.models["b"]
    assert a.path == tmp_path / "m.gguf"
    assert a.defaults.ctx_size == 512
    assert a.args == ("--threads", "1")  # the operator's, always passed
    assert a.defaults.backend_args == ()  # a client's extra arguments: none by default
    assert b.recipe is Recipe.COMMAND
    assert b.type is ModelType.EMBEDDING
    assert b.command[2] == "{port}"


def test_environment_overrides_file_and_flags_override_both(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:1"\n[pool]\nidle_unload_seconds = 5\n')
    env = {
        "LEMONADE_GRPC_LISTEN": "127.0.0.1:2",
        "LEMONADE_GRPC_IDLE_UNLOAD_SECONDS": "7",
        "LEMONADE_GRPC_MAX_LOADED_LLM": "3",
        "LEMONADE_GRPC_CONFIG": str(path),
    }
    config = load(Overrides(), env=env)
    assert config.listen == "127.0.0.1:2"
    assert config.pool.idle_unload_seconds == 7
    assert config.pool.max_loaded[ModelType.LLM] == 3
    assert load(Overrides(listen="127.0.0.1:3"), env=env).listen == "127.0.0.1:3"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"LEMONADE_GRPC_MAX_LOADED_LLM": "zero"}, "LEMONADE_GRPC_MAX_LOADED_LLM"),
        ({"LEMONADE_GRPC_IDLE_UNLOAD_SECONDS": "-1"}, "LEMONADE_GRPC_IDLE_UNLOAD_SECONDS"),
        ({"LEMONADE_GRPC_LISTEN": "50051"}, "server.listen"),
    ],
)
def test_bad_environment_values_name_the_variable(tmp_path: Path, env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(Overrides(), env=env)
    assert raised.value.field == field


def test_reserved_backend_args_are_refused_in_the_catalog(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.a]\npath = "m.gguf"\nargs = ["--port", "1"]\n')
    with pytest.raises(ConfigError) as raised:
        load(Overrides(config=path), env={})
    assert raised.value.field == "models.a.args"


def test_lifecycle_settings_from_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[pool]\nmemory_reserve_mb = 256\nmemory_check_seconds = 0\nhealth_check_seconds = 2.5\n"
        "health_check_failures = 4\nrestart_backoff_seconds = 0.5\nrestart_backoff_max_seconds = 30\n"
        "max_restarts = 3\nrestart_window_seconds = 120\n",
    )
    pool = load(Overrides(config=path, state_dir=tmp_path), env={}).pool
    assert pool.memory_reserve_bytes == 256 << 20
    assert pool.memory_check_seconds == 0
    assert (pool.health_check_seconds, pool.health_check_failures) == (2.5, 4)
    assert (pool.restart_backoff_seconds, pool.restart_backoff_max_seconds) == (0.5, 30)
    assert (pool.max_restarts, pool.restart_window_seconds) == (3, 120)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("memory_reserve_mb = -1", "pool.memory_reserve_mb"),
        ("health_check_failures = 0", "pool.health_check_failures"),
        ('restart_backoff_seconds = "soon"', "pool.restart_backoff_seconds"),
    ],
)
def test_bad_lifecycle_settings_name_the_field(tmp_path: Path, line: str, field: str) -> None:
    path = write(tmp_path, f"[pool]\n{line}\n")
    with pytest.raises(ConfigError) as error:
        load(Overrides(config=path, state_dir=tmp_path), env={})
    assert error.value.field == field


def test_telemetry_settings_from_file_environment_and_flag(tmp_path: Path) -> None:
    path = write(tmp_path, '[telemetry]\nprometheus_listen = "127.0.0.1:9464"\nlog_format = "json"\n')
    telemetry = load(Overrides(config=path, state_dir=tmp_path), env={}).telemetry
    assert (telemetry.prometheus_listen, telemetry.log_format) == ("127.0.0.1:9464", "json")
    env = {"LEMONADE_GRPC_PROMETHEUS_LISTEN": "0.0.0.0:9000", "LEMONADE_GRPC_LOG_FORMAT": "plain"}
    telemetry = load(Overrides(config=path, state_dir=tmp_path), env=env).telemetry
    assert (telemetry.prometheus_listen, telemetry.log_format) == ("0.0.0.0:9000", "plain")
    flagged = load(Overrides(config=path, state_dir=tmp_path, log_format="plain"), env={}).telemetry
    assert flagged.log_format == "plain"
    default = load(Overrides(state_dir=tmp_path), env={}).telemetry
    assert (default.prometheus_listen, default.log_format) == (None, "plain")


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('prometheus_listen = "9464"', "telemetry.prometheus_listen"),
        ("prometheus_listen = 9464", "telemetry.prometheus_listen"),
        ('log_format = "xml"', "telemetry.log_format"),
        ("log_format = 1", "telemetry.log_format"),
        ('exporter = "otlp"', "telemetry.exporter"),
    ],
)
def test_bad_telemetry_settings_name_the_field(tmp_path: Path, line: str, field: str) -> None:
    path = write(tmp_path, f"[telemetry]\n{line}\n")
    with pytest.raises(ConfigError) as error:
        load(Overrides(config=path, state_dir=tmp_path), env={})
    assert error.value.field == field


def test_an_embedding_models_pooling_comes_from_the_catalog_else_its_gguf_else_last(tmp_path: Path) -> None:
    """issue 19: a model of type embedding is started to embed, with a pooling decided with the config."""
    tiny = ensure_tiny_model()  # a GGUF that names no pooling
    path = write(
        tmp_path,
        f"""
[models.named]
path = "{tiny}"
type = "embedding"
pooling = "mean"
[models.gguf]
path = "{tiny}"
type = "embedding"
ctx_size = 1024
[models.chat]
path = "{tiny}"
""",
    )
    models = load(Overrides(config=path), env={}).models
    assert (models["named"].pooling, models["gguf"].pooling, models["chat"].pooling) == ("mean", "last", None)
    gguf = models["gguf"]
    assert embedding_args(gguf, gguf.defaults) == [
        *("--embeddings", "--pooling", "last"),
        *("--batch-size", "1024", "--ubatch-size", "1024"),
    ]
    chat = models["chat"]
    assert "--embeddings" not in backend_argv(chat, chat.defaults, 8080)


@pytest.mark.parametrize(
    "entry",
    [
        'path = "m.gguf"\ntype = "embedding"\npooling = "none"',  # Embed needs a pooled vector
        'path = "m.gguf"\ntype = "embedding"\npooling = 3',
        'path = "m.gguf"\npooling = "mean"',  # a chat model
        'recipe = "command"\npath = "m.gguf"\ntype = "embedding"\ncommand = ["{port}"]\npooling = "mean"',
    ],
)
def test_a_pooling_that_cannot_apply_names_the_field(tmp_path: Path, entry: str) -> None:
    path = write(tmp_path, f"[models.e]\n{entry}\n")
    with pytest.raises(ConfigError) as refused:
        load(Overrides(config=path), env={})
    assert refused.value.field == "models.e.pooling"
