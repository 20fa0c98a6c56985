"""The bundled tiny model: a deterministic llama GGUF with random weights.

Models cannot be downloaded where this project runs, so it makes its own: a
real llama-architecture GGUF (2 layers, 64-wide) that llama-server loads in
milliseconds and runs at thousands of tokens per second on one core. Its text
is gibberish; it exists to exercise the plumbing for real.

The vocabulary is SentencePiece-style ("llama" tokenizer): three control
tokens, the 256 byte-fallback tokens (so any UTF-8 prompt tokenizes), and one
normal token per printable ASCII character plus the word-boundary mark, so
generated text reads as characters rather than `<0x41>` pieces.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lemonade_grpc.provision.paths import cache_root

# Bump whenever the bytes written change: the cache file name includes it.
GENERATOR_VERSION = 1

_SPACE_MARK = "\u2581"  # SentencePiece's word-boundary mark, shown as a space
_CONTROL = ("<unk>", "<s>", "</s>")
_PRINTABLE = tuple(chr(c) for c in range(0x21, 0x7F))
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the byte-level vocabulary."""
    import gguf

    tokens = list(_CONTROL)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [_SPACE_MARK, *_PRINTABLE]
    types += [gguf.TokenType.NORMAL] * (1 + len(_PRINTABLE))
    scores = [0.0] * len(tokens)
    return tokens, scores, [int(t) for t in types]


def generate(
    path: Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    context_length: int = 65536,
    seed: int = 0,
) -> None:
    """Write the model to `path` (atomically: a temporary file, then a rename).

    The same arguments always give the same bytes. `context_length` is large
    because llama-server caps each slot's context at it: a small value would
    stop long generations early.
    """
    # Imported here: only generating needs them (numpy is 12 MiB the serving process need not hold).
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocabulary()
    n_vocab = len(tokens)

    def weights(*shape: int, scale: float = 0.02) -> np.ndarray:
        # numpy shape is (out, in): GGUF stores dimensions reversed.
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(temporary), "llama")
    writer.add_name("lemonade-grpc tiny")
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(_CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd, scale=1.0))
    for layer in range(n_layer):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    # Only the printable tokens get output weights, large enough that their
    # logits dominate: sampling then yields readable characters (not control
    # or raw byte tokens) and rarely the end-of-sequence token, so
    # generations run to max_tokens.
    output = np.zeros((n_vocab, n_embd), dtype=np.float32)
    first_printable = len(_CONTROL) + 256
    output[first_printable:] = weights(n_vocab - first_printable, n_embd, scale=0.5)
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(temporary, path)


# The sizes the generator makes. `medium` (about 400 MB of F32 weights, 8
# layers 1024 wide) loads for long enough that its progress can be watched
# (issue 12); the same vocabulary and template as `tiny`.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "medium": {"n_embd": 1024, "n_layer": 8, "n_head": 8, "n_ff": 2816},
}


def model_path(size: str = "tiny") -> Path:
    """Where the generated model of `size` is cached for this generator version."""
    return cache_root() / "models" / f"{size}-v{GENERATOR_VERSION}.gguf"


def tiny_model_path() -> Path:
    """Where the bundled model is cached for this generator version."""
    return model_path("tiny")


def ensure_model(size: str = "tiny") -> Path:
    """Generate the model of `size` (a key of `SIZES`) unless it is cached; return its path.

    Safe to call twice or from two processes at once: each writes its own
    temporary file and the rename is atomic.
    """
    path = model_path(size)
    if not path.is_file():
        generate(path, **SIZES[size])
    return path


def ensure_tiny_model() -> Path:
    """Generate the bundled model unless it is cached; return its path."""
    return ensure_model("tiny")


def sha256(path: Path) -> str:
    """Hex digest of a file (for checking that generation is deterministic)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
