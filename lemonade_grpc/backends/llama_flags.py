"""llama-server flags the control plane owns: refused in a llamacpp model's `args` and `allowed_args`."""

from __future__ import annotations

# Arguments the control plane owns: a llama-server started with another
# port, host, model or key would be unreachable or serve the wrong model. The
# config refuses them in `args` and `allowed_args` of a llamacpp model.
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


def is_reserved(flag: str | None) -> bool:
    """Whether llama-server would read `flag` as one of `RESERVED_BACKEND_ARGS`. Pure.

    llama-server reads `_` as `-` in a long flag (`--ctx_size` is
    `--ctx-size`), so the check does too.
    """
    if flag is None:
        return False
    if flag.startswith("--"):
        flag = "--" + flag[2:].replace("_", "-")
    return flag in RESERVED_BACKEND_ARGS
