"""A tiny gemma4_unified base, shaped like the real 12B wherever a code path depends on it.

Real weights can't be downloaded here, so every loading path is exercised on this model:
it is written with `save_pretrained` and read back with `from_pretrained`/`AutoProcessor`
like any checkpoint. The tokenizer (`assets/tokenizer.json`) is a small BPE with byte
fallback and the Gemma 4 special tokens; `build_tokenizer_json()` regenerates it.

Shape choices that matter (each was needed by a real code path: llama.cpp's converter, chunked CE):
- full-attention layers with `attention_k_eq_v` (no v_proj) and 1 global kv head, and a
  `global_head_dim` that differs from `head_dim` (llama.cpp's converter needs the difference);
- `final_logit_softcapping: 30` so chunked CE is tested with the soft-cap;
- sliding and full layers both present, last layer full;
- `vocab_size == len(tokenizer)` exactly (llama.cpp checks embedding rows).
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_JSON = ASSETS / "tokenizer.json"

# Special tokens, in id order after the 256 byte-fallback tokens' predecessors.
SPECIAL = {
    "pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>",
    "turn_start": "<|turn>", "turn_end": "<turn|>",
    "channel_start": "<|channel>", "channel_end": "<channel|>",
    "image": "<|image|>", "boi": "<|image>", "eoi": "<image|>",
    "audio": "<|audio|>", "boa": "<|audio>", "eoa": "<audio|>",
    "video": "<|video|>",
    # Thinking, tool declarations, calls, responses and the string quote of Gemma 4's format
    # (the real tokenizer has each as one special token; `<|tool_response>` also ends a turn of calls).
    "think": "<|think|>", "tool_start": "<|tool>", "tool_end": "<tool|>",
    "call_start": "<|tool_call>", "call_end": "<tool_call|>",
    "response_start": "<|tool_response>", "response_end": "<tool_response|>", "quote": '<|"|>',
}
VOCAB_SIZE = 1024  # BPE target; the real size is len(tokenizer), fewer when merges run out

# Our own Gemma 4 chat template (the official one can't be committed; the `templates` test tier
# renders with it). It renders what the official template renders for: a system turn
# (string content; a list's text parts are joined, where the official prints the list's repr),
# `<|think|>` at its top with `enable_thinking`, tool declarations with flat parameters
# (description, enum, type: nested schemas only name their type), turns `<|turn>{role}\n…<turn|>\n`
# with the assistant as `model`, text trimmed, media inline, thinking stripped from model turns,
# OpenAI tool calls and `tool` responses inside the model turn (`<|tool_call>…<tool_call|>`,
# `<|tool_response>…<tool_response|>`, strings in `<|"|>`), and the generation prompt with the
# empty thought scaffold unless thinking is on. No {% generation %} markers, like the official:
# label masks come from rendering.
CHAT_TEMPLATE = r"""
{%- macro arg(value) -%}
{%- if value is string -%}{{ '<|"|>' + value + '<|"|>' }}
{%- elif value is boolean -%}{{ 'true' if value else 'false' }}
{%- elif value is mapping -%}{{ '{' }}{%- for k, v in value | dictsort -%}{{ k }}:{{ arg(v) }}{{ '' if loop.last else ',' }}{%- endfor -%}{{ '}' }}
{%- elif value is sequence -%}{{ '[' }}{%- for v in value -%}{{ arg(v) }}{{ '' if loop.last else ',' }}{%- endfor -%}{{ ']' }}
{%- else -%}{{ value }}
{%- endif -%}
{%- endmacro -%}
{%- macro quoted_list(items) -%}
[{%- for x in items -%}{{ '<|"|>' + x + '<|"|>' }}{{ '' if loop.last else ',' }}{%- endfor -%}]
{%- endmacro -%}
{%- macro declaration(tool) -%}
{%- set f = tool['function'] if tool['function'] is defined else tool -%}
declaration:{{ f['name'] }}{description:<|"|>{{ f['description'] }}<|"|>
{%- set params = f['parameters'] -%}
{%- if params -%}
,parameters:{
{%- if params['properties'] -%}
properties:{
{%- for key, value in params['properties'] | dictsort -%}
{{ key }}:{
{%- set ns = namespace(sep='') -%}
{%- if value['description'] -%}description:<|"|>{{ value['description'] }}<|"|>{%- set ns.sep = ',' -%}{%- endif -%}
{%- if value['enum'] -%}{{ ns.sep }}enum:{{ arg(value['enum']) }}{%- set ns.sep = ',' -%}{%- endif -%}
{{ ns.sep }}type:<|"|>{{ value['type'] | upper }}<|"|>}{{ '' if loop.last else ',' }}
{%- endfor -%}
},
{%- endif -%}
{%- if params['required'] -%}required:{{ quoted_list(params['required']) }},{%- endif -%}
{%- if params['type'] -%}type:<|"|>{{ params['type'] | upper }}<|"|>}{%- endif -%}
{%- endif -%}
}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
{%- set ns = namespace(out='') -%}
{%- for piece in text.split('<channel|>') -%}
{%- set ns.out = ns.out + (piece.split('<|channel>')[0] if '<|channel>' in piece else piece) -%}
{%- endfor -%}
{{ ns.out | trim }}
{%- endmacro -%}
{{ bos_token }}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set loop_messages = messages -%}
{%- if thinking or tools or (messages and messages[0]['role'] in ['system', 'developer']) -%}
{{ '<|turn>system\n' }}
{%- if thinking -%}{{ '<|think|>\n' }}{%- endif -%}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- if messages[0]['content'] is string -%}{{ messages[0]['content'] | trim }}
{%- else -%}{%- for item in messages[0]['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- set loop_messages = messages[1:] -%}
{%- endif -%}
{%- for tool in tools or [] -%}{{ '<|tool>' + declaration(tool) | trim + '<tool|>' }}{%- endfor -%}
{{ '<turn|>\n' }}
{%- endif -%}
{%- set last = namespace(user=-1, after=None) -%}
{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}{%- set last.user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for message in loop_messages -%}
{%- set i = loop.index0 -%}
{%- if message['role'] != 'tool' -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- set prev = namespace(role=None) -%}
{%- for j in range(i) -%}{%- if loop_messages[j]['role'] != 'tool' -%}{%- set prev.role = loop_messages[j]['role'] -%}{%- endif -%}{%- endfor -%}
{%- if not (role == 'model' and prev.role == 'assistant') -%}{{ '<|turn>' + role + '\n' }}{%- endif -%}
{%- set last.after = None -%}
{%- set calls = message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] else [] -%}
{%- set trace = message['reasoning_content'] if message['reasoning_content'] is defined else none -%}
{%- if trace and calls and i > last.user -%}{{ '<|channel>thought\n' + trace + '\n<channel|>' }}{%- endif -%}
{%- for call in calls -%}
{{ '<|tool_call>call:' + call['function']['name'] + '{' }}
{%- if call['function']['arguments'] is mapping -%}
{%- for k, v in call['function']['arguments'] | dictsort -%}{{ k }}:{{ arg(v) }}{{ '' if loop.last else ',' }}{%- endfor -%}
{%- else -%}{{ call['function']['arguments'] }}
{%- endif -%}
{{ '}<tool_call|>' }}
{%- set last.after = 'tool_call' -%}
{%- endfor -%}
{%- set answered = namespace(any=false, open=true) -%}
{%- if calls -%}
{%- for k in range(i + 1, loop_messages | length) -%}
{%- if answered.open and loop_messages[k]['role'] == 'tool' -%}
{%- set reply = loop_messages[k] -%}
{%- set who = namespace(name=reply['name'] if reply['name'] is defined and reply['name'] else 'unknown') -%}
{%- for call in calls -%}{%- if call['id'] is defined and reply['tool_call_id'] is defined and call['id'] == reply['tool_call_id'] -%}{%- set who.name = call['function']['name'] -%}{%- endif -%}{%- endfor -%}
{%- if reply['content'] is string -%}{%- set body = reply['content'] -%}
{%- else -%}{%- set body = namespace(s='') -%}{%- for part in reply['content'] -%}{%- if part['type'] == 'text' -%}{%- set body.s = body.s + part['text'] -%}{%- endif -%}{%- endfor -%}{%- set body = body.s -%}
{%- endif -%}
{{ '<|tool_response>response:' + who.name + '{value:' + arg(body) + '}<tool_response|>' }}
{%- set answered.any = true -%}
{%- set last.after = 'tool_response' -%}
{%- else -%}{%- set answered.open = false -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- if message['content'] is string -%}
{{ strip_thinking(message['content']) if role == 'model' else message['content'] | trim }}
{%- elif message['content'] is sequence -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}{{ '<|image|>' }}
{%- elif item['type'] == 'audio' -%}{{ '<|audio|>' }}
{%- elif item['type'] == 'video' -%}{{ '<|video|>' }}
{%- elif item['type'] == 'text' -%}{{ strip_thinking(item['text']) if role == 'model' else item['text'] | trim }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- if last.after == 'tool_call' -%}{{ '<|tool_response>' }}
{%- elif not (answered.any and not message['content']) -%}{{ '<turn|>\n' }}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and last.after not in ['tool_call', 'tool_response'] -%}
{{ '<|turn>model\n' }}
{%- if not thinking -%}{{ '<|channel>thought\n<channel|>' }}{%- endif -%}
{%- endif -%}
"""


def tiny_config_dict(*, num_kv_shared_layers: int = 0, num_layers: int = 4, tokenizer=None) -> dict:
    """Keyword arguments for Gemma4UnifiedConfig; token ids match the tokenizer (default: the shipped one)."""
    tokenizer = tokenizer or load_tokenizer()
    ids = special_ids(tokenizer)
    vocab_size = len(tokenizer)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "global_head_dim": 64,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        # Alternating, ending on a full layer (as the 12B's 5:1 pattern does).
        "layer_types": ["sliding_attention", "full_attention"] * (num_layers // 2),
        "sliding_window": 64,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 8192,
        "num_kv_shared_layers": num_kv_shared_layers,
        "pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        # llama.cpp's converter looks this key up on gemma4 text configs.
        "moe_intermediate_size": None,
        "tie_word_embeddings": True,
    }
    vision = {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 64,
              "output_proj_dims": 64, "mm_posemb_size": 1120}
    return {
        "text_config": text,
        "vision_config": vision,
        "audio_config": {"audio_embed_dim": 640},
        "image_token_id": ids["image"], "boi_token_id": ids["boi"], "eoi_token_id": ids["eoi"],
        "audio_token_id": ids["audio"], "boa_token_id": ids["boa"], "eoa_token_index": ids["eoa"],
        "video_token_id": ids["video"],
        "tie_word_embeddings": True,
        "pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
    }


def special_ids(tokenizer=None) -> dict[str, int]:
    """Ids of the special tokens: in the shipped tokenizer they come first, in SPECIAL order."""
    if tokenizer is None:
        return {k: i for i, k in enumerate(SPECIAL)}
    return {k: tokenizer.convert_tokens_to_ids(t) for k, t in SPECIAL.items()}


def _corpus() -> list[str]:
    from finetune.demo.data import corpus_lines

    generic = (
        "The quick brown fox jumps over the lazy dog. A model reads images, listens to audio "
        "and answers questions about what it sees and hears. Fine-tuning adapts a base model "
        "to a domain with a small adapter. What is this? Describe the picture. Transcribe the "
        "audio. Answer with one word. Yes or no. The answer is short. Numbers 0 1 2 3 4 5 6 7 8 9."
    )
    # The words of tool declarations, calls and responses, one item each: Gemma 4's template
    # writes them with no space before (`call:get_weather{city:`), so they are learnt unprefixed.
    tool_words = ("call get_weather get_time city declaration description parameters properties "
                  "required type STRING OBJECT response value : { } , [ ]").split()
    tools = "Weather Time of a city sunny rainy cloudy snowy windy. It is in now. Hello! Thanks, bye."
    return [generic] * 4 + (tool_words + [tools]) * 4 + corpus_lines()


def build_tokenizer_json(path: Path = TOKENIZER_JSON) -> None:
    """Train the small BPE (deterministic) and write tokenizer.json. Run once; committed."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = list(SPECIAL.values())
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # SentencePiece-style: spaces become ▁ and stay attached to the following word.
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials + byte_tokens, show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789▁.,?!'-:\n"),
        min_frequency=1)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def load_tokenizer():
    """The shipped tokenizer wrapped for transformers, with Gemma 4's named special tokens."""
    from transformers import (
        GemmaTokenizerFast,  # noqa: F401  (registers the class)
        PreTrainedTokenizerFast,
    )

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_JSON),
        bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        extra_special_tokens={
            "image_token": SPECIAL["image"], "boi_token": SPECIAL["boi"], "eoi_token": SPECIAL["eoi"],
            "audio_token": SPECIAL["audio"], "boa_token": SPECIAL["boa"], "eoa_token": SPECIAL["eoa"],
        },
        padding_side="right",
        model_max_length=8192,
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer=None, image_tokens: int = 70):
    from transformers.models.gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
        Gemma4UnifiedImageProcessor,
        Gemma4UnifiedProcessor,
    )
    from transformers.models.gemma4_unified.video_processing_gemma4_unified import (
        Gemma4UnifiedVideoProcessor,
    )

    tokenizer = tokenizer or load_tokenizer()
    template = tokenizer.chat_template or CHAT_TEMPLATE
    return Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
        image_processor=Gemma4UnifiedImageProcessor(max_soft_tokens=image_tokens),
        video_processor=Gemma4UnifiedVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=image_tokens,
    )


def build_tiny_model(seed: int = 0, *, num_kv_shared_layers: int = 0, num_layers: int = 4, tokenizer=None):
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    config = Gemma4UnifiedConfig(**tiny_config_dict(num_kv_shared_layers=num_kv_shared_layers,
                                                     num_layers=num_layers, tokenizer=tokenizer))
    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(config)
    # With initializer_range 0.02 the tied embedding rows have norm ~0.2, so after the final
    # norm no logit can exceed ~2.6 and no adapter can push the loss below ~4 nats. Trained
    # embeddings are far larger; std 0.1 gives a usable logit range (still soft-capped at 30).
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(0.0, 0.1)
    return model.eval()


def write_tiny_model(out: str | Path, seed: int = 0, *, num_kv_shared_layers: int = 0,
                     num_layers: int = 4, tokenizer: str | Path | None = None) -> Path:
    """Write a complete base folder (config, weights, tokenizer, processor, template) and its
    tiny MTP drafter in `drafter/` (finetune.demo.tiny_drafter). `tokenizer`: a real Gemma 4
    tokenizer (folder or llama.cpp vocab GGUF, finetune.demo.tokenizer) instead of the tiny one;
    the base then has its vocabulary and, when it carries one, its chat template."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = None
    if tokenizer is not None:
        from finetune.demo.tokenizer import load_gemma4_tokenizer

        tok = load_gemma4_tokenizer(tokenizer, chat_template=CHAT_TEMPLATE)
    model = build_tiny_model(seed, num_kv_shared_layers=num_kv_shared_layers, num_layers=num_layers,
                             tokenizer=tok)
    processor = build_processor(tok)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size, "vocab mismatch"
    # Like the released instruction-tuned Gemma 4: generation stops at the end of a turn and at
    # the token that hands a turn of tool calls over to the tools, not only at <eos>.
    ids = special_ids(tok)
    model.generation_config.eos_token_id = [ids["eos"], ids["turn_end"], ids["response_start"]]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "finetune_tiny.json").write_text(json.dumps({"seed": seed, "kind": "tiny gemma4_unified"}))
    from finetune.demo.tiny_drafter import write_tiny_drafter

    write_tiny_drafter(out, seed=seed)  # its MTP drafter, in out/drafter/
    return out
