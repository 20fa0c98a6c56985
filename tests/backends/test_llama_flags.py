"""llama-server flags the control plane owns, refused in any spelling llama-server reads (issue 9)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "line",
    [
        'args = ["--ctx_size", "64"]',
        'args = ["--api_key", "secret"]',
        'allowed_args = ["--api_key"]',
        'allowed_args = ["--model_url"]',
        'allowed_args = ["--hf_repo"]',
    ],
)
def test_llama_servers_underscore_spellings_of_reserved_flags_are_refused(
    tmp_path: Path, tiny_model: Path, line: str
) -> None:
    """llama-server reads `--ctx_size` as `--ctx-size` (it turns `_` into `-` in `--` flags:
    `llama-server --port_x 1` says "invalid argument: --port-x", and `--log_file F` writes F).

    Promised (llama_flags.py RESERVED_BACKEND_ARGS): "The config refuses them in `args` and
    `allowed_args` of a llamacpp model".
    """
    from lemonade_grpc import config as config_module

    path = tmp_path / "config.toml"
    path.write_text(f'[models.tiny]\nrecipe = "llamacpp"\npath = "{tiny_model}"\n{line}\n')
    with pytest.raises(config_module.ConfigError):
        config_module.load(config_module.Overrides(config=path), env={})
