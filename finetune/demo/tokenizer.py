"""The real Gemma 4 tokenizer for a tiny base, from a tokenizer folder or llama.cpp's vocab GGUF.

The folder, or the GGUF (Gemma 4's `ggml-vocab-gemma-4.gguf` from llama-cpp-python's source
archive), becomes a fast tokenizer with Gemma 4's named special tokens, so a tiny
`gemma4_unified` trains on the real vocabulary.

The GGUF goes through transformers' own converter (`get_gguf_tokenizer` +
`convert_gguf_tokenizer`: `AutoTokenizer.from_pretrained(dir, gguf_file=…)` builds a model config
from the file and fails on a tokenizer-only GGUF); the chat template embedded in the file comes
with it. Nothing converted is ever committed: it is built where it is used.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError

# The names the processor reads, with the token each stands for (the same in the tiny tokenizer).
NAMED = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
         "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
ROLES = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def load_gemma4_tokenizer(path: str | Path, chat_template: str | None = None):
    """`path` (a folder with tokenizer.json, or a `.gguf`) → PreTrainedTokenizerFast with Gemma 4's
    special tokens; its chat template is the file's own, else `chat_template`."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    template = None
    if p.is_dir() and (p / "tokenizer.json").is_file():
        backend = {"tokenizer_file": str(p / "tokenizer.json")}
        jinja = p / "chat_template.jinja"
        template = jinja.read_text() if jinja.is_file() else None
    elif p.is_file() and p.suffix == ".gguf":
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        arch, tokens, config = get_gguf_tokenizer(str(p))
        tokenizer, _ = convert_gguf_tokenizer(arch, tokens)
        backend = {"tokenizer_object": tokenizer}
        template = config.get("chat_template")
    else:
        raise UserError("--tokenizer", f"{path} is neither a folder with tokenizer.json nor a .gguf file",
                        "Give a tokenizer folder or a llama.cpp vocab GGUF")
    tok = PreTrainedTokenizerFast(**backend, **ROLES, extra_special_tokens=NAMED, padding_side="right",
                                  chat_template=template or chat_template)
    missing = [t for t in [*ROLES.values(), *NAMED.values(), "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
               if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id) and t != "<unk>"]
    if missing:
        raise UserError("--tokenizer", f"{path} lacks Gemma 4's special tokens {missing}",
                        "Use a Gemma 4 tokenizer")
    return tok
