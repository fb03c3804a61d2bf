"""Record layouts → the canonical `Conversation`.

`parse_record` knows five layouts (the recipe's `format`):
- `messages`: `{"messages": [{"role", "content": str | [parts]}]}` (OpenAI / Hugging Face chat).
  Parts: `{"type": "text", "text"}`, `{"type": "image"|"audio", "path"|"url"|"base64"|"image"|"audio"}`,
  OpenAI's `image_url` / `input_audio` and vLLM's `audio_url`. A media part with no reference is
  a placeholder filled, in order, from the record's `images` / `audios` column (TRL's layout).
  Assistant turns may carry a reasoning trace (`reasoning_content`, `reasoning` or `thinking`)
  and `tool_calls`; `tool` turns answer them; the record's `tools` declares the functions
  (`data_tools.tools` reads and checks these).
- `sharegpt`: `{"conversations": [{"from", "value"}], "images"|"image", "audios"|"audio"}`, with
  `<image>` / `<audio>` placeholders in the values taking the listed media in order.
- `text`: `{"text"}`, continued pre-training: one user message, trained on in full.
- `instruction`: `prompt`|`instruction`(+`input`) and `response`|`output`|`completion`, optional
  `system` and `image(s)` / `audio(s)` (placed before the prompt).
- `prompt` (online RL, TRL's prompt-only layout): `prompt` as text or a list of chat messages,
  optional `system` and `image(s)` / `audio(s)`, and any other columns, which travel with the
  sample to the reward functions (`prompt_columns`); a `solution` column is also the reference
  answer the built-in rewards and `finetune eval` compare with.

A media reference is a path (relative to the data file's folder), an http(s) URL, a `data:`
URL, base64 text, raw bytes, or a Hugging Face `{"bytes", "path"}` cell. Every problem with a
record raises `BadRecord` with a key from `REASONS`; nothing else escapes.
"""

from __future__ import annotations

import base64
import json
import re
from collections import deque
from collections.abc import Iterator

from data_tools.conversation import BadRecord, Conversation, Message, Part
from data_tools.sources import iter_records
from data_tools.tools import check_tool_flow, parse_tool_calls, parse_tools

_ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "tool": "tool",
}
_TRACE_KEYS = ("reasoning_content", "reasoning", "thinking")
_PLACEHOLDER = re.compile(r"<(image|audio)>")


def parse_record(record: dict, fmt: str, origin: str, base_dir: str) -> Conversation:
    """One record in layout `fmt` → a Conversation; raises `BadRecord` for anything unusable."""
    parser = _PARSERS[fmt]  # the recipe validator only lets known formats through
    try:
        if not isinstance(record, dict):
            raise BadRecord("wrong_shape", f"a {type(record).__name__}, not an object")
        messages = parser(record)
        tools = parse_tools(record.get("tools")) if fmt in ("messages", "prompt") else []
        check_tool_flow(messages, tools)
    except BadRecord as bad:
        raise BadRecord(bad.reason, bad.detail, origin, raw=record) from None
    return Conversation(messages, origin=origin, base_dir=base_dir,
                        kind=fmt if fmt in ("text", "prompt") else "chat", raw=record, tools=tools)


def iter_conversations(spec, *, base_dir: str | None = None) -> Iterator[Conversation | BadRecord]:
    """`iter_records` + `parse_record`: every record of `spec` as a Conversation or a BadRecord."""
    for origin, record, folder in iter_records(spec, base_dir=base_dir):
        if isinstance(record, BadRecord):
            yield record
            continue
        try:
            conv = parse_record(record, spec.format, origin, folder)
        except BadRecord as bad:
            yield bad
            continue
        conv.dataset = spec.path
        yield conv


# -- the layouts -----------------------------------------------------------------------

def _parse_messages(record: dict, answered: bool = True) -> list[Message]:
    turns = record.get("messages")
    if not isinstance(turns, list):
        raise BadRecord("wrong_shape", "no 'messages' list (rename yours with `columns: {messages: ...}`)")
    pending = {"image": deque(_media_values(record, "images")),
               "audio": deque(_media_values(record, "audios"))}
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord("wrong_shape", f"message {i} is a {type(turn).__name__}, not an object")
        role = _role(turn.get("role"), i)
        content = turn.get("content")
        if role == "tool" and isinstance(content, (dict, int, float, bool)):
            content = json.dumps(content, default=str)  # a structured tool result, as its JSON text
        if isinstance(content, str):
            parts = [Part("text", text=content)] if content else []
        elif isinstance(content, list):
            parts = [_content_part(p, i, pending) for p in content]
        elif content is None:  # e.g. an assistant tool call; an empty final answer is caught below
            parts = []
        else:
            raise BadRecord("wrong_shape", f"message {i} content is a {type(content).__name__}")
        messages.append(_message(role, parts, turn, i))
    for kind, left in pending.items():
        if left:
            raise BadRecord("placeholder_mismatch", f"{len(left)} {kind}(s) listed but no {kind} part takes them")
    if answered:
        _check_chat(messages)
    return messages


def _message(role: str, parts: list[Part], turn: dict, i: int) -> Message:
    """The tool and reasoning fields of message `i`, checked for its role."""
    m = Message(role, parts)
    if role == "assistant":
        m.tool_calls = parse_tool_calls(turn.get("tool_calls"), i)
        trace = next((turn[k] for k in _TRACE_KEYS if turn.get(k) is not None), None)
        if trace is not None and not isinstance(trace, str):
            raise BadRecord("wrong_shape", f"message {i} reasoning is a {type(trace).__name__}, not text")
        m.thinking = trace.strip() or None if trace else None
    elif turn.get("tool_calls"):
        raise BadRecord("wrong_shape", f"message {i} has tool_calls but role {role!r}; only the assistant calls tools")
    if role == "tool":
        if any(p.type != "text" for p in parts):
            raise BadRecord("wrong_shape", f"message {i} (tool) carries media; a tool answers in text")
        call_id, name = turn.get("tool_call_id"), turn.get("name")
        if call_id is None and not name:
            raise BadRecord("wrong_shape", f"message {i} (tool) has neither tool_call_id nor name")
        m.tool_call_id = str(call_id) if call_id is not None else None
        m.name = name if isinstance(name, str) and name else None
    return m


def _parse_sharegpt(record: dict) -> list[Message]:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise BadRecord("wrong_shape", "no 'conversations' list (rename yours with `columns`)")
    values = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord("wrong_shape", f"turn {i} is not {{'from': ..., 'value': str}}")
        values.append((_role(turn.get("from"), i), turn["value"]))
    media = {"image": deque(_media_values(record, "images", "image")),
             "audio": deque(_media_values(record, "audios", "audio"))}
    for kind, listed in media.items():
        used = sum(len(re.findall(f"<{kind}>", v)) for _, v in values)
        if used != len(listed):
            raise BadRecord("placeholder_mismatch", f"{used} <{kind}> placeholder(s) but {len(listed)} {kind}(s)")
    messages = [Message(role, _split_placeholders(value, media)) for role, value in values]
    _check_chat(messages)
    return messages


def _parse_text(record: dict) -> list[Message]:
    text = record.get("text")
    if not isinstance(text, str):
        raise BadRecord("wrong_shape", "no 'text' string (rename yours with `columns: {text: ...}`)")
    if not text.strip():
        raise BadRecord("no_answer", "empty text")
    return [Message("user", [Part("text", text=text)])]


def _parse_instruction(record: dict) -> list[Message]:
    if not {"prompt", "instruction", "input", "response", "output", "completion"} & record.keys():
        raise BadRecord("wrong_shape", "no prompt/response fields (map yours with `columns`)")
    prompt = _first_str(record, "prompt")
    if prompt is None:
        # Alpaca: the optional `input` is the material the instruction is about.
        prompt = "\n\n".join(s for s in (_first_str(record, "instruction"), _first_str(record, "input")) if s)
    media = [_media_part("image", v) for v in _media_values(record, "images", "image")]
    media += [_media_part("audio", v) for v in _media_values(record, "audios", "audio")]
    user = Message("user", media + ([Part("text", text=prompt)] if prompt.strip() else []))
    answer = _first_str(record, "response", "output", "completion") or ""
    messages = [user, Message("assistant", [Part("text", text=answer)] if answer else [])]
    system = _first_str(record, "system")
    if system:
        messages.insert(0, Message("system", [Part("text", text=system)]))
    _check_chat(messages)
    return messages


# The prompt layout's own keys; every other column of a record is passed to the rewards.
PROMPT_KEYS = ("prompt", "system", "images", "image", "audios", "audio", "tools")


def _parse_prompt(record: dict) -> list[Message]:
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        messages = _parse_messages({"messages": prompt, "images": record.get("images"),
                                    "audios": record.get("audios")}, answered=False)
    elif isinstance(prompt, str) and prompt.strip():
        media = [_media_part("image", v) for v in _media_values(record, "images", "image")]
        media += [_media_part("audio", v) for v in _media_values(record, "audios", "audio")]
        messages = [Message("user", media + [Part("text", text=prompt)])]
    else:
        raise BadRecord("wrong_shape", "no 'prompt' text or message list (rename yours with `columns: {prompt: ...}`)")
    if messages[-1].role == "assistant":
        raise BadRecord("wrong_shape", "the prompt ends with an assistant message; give the reference answer as a "
                        "'solution' column")
    system = _first_str(record, "system")
    if system and messages[0].role != "system":
        messages.insert(0, Message("system", [Part("text", text=system)]))
    if not any(m.role == "user" and _has_content(m) for m in messages):
        raise BadRecord("no_user_turn", "no user message with content")
    solution = record.get("solution")
    # The answer turn the prompt is served before: the reference when there is one, else empty
    # (only its end is labelled, which is where the served prompt ends).
    text = "" if solution is None else solution if isinstance(solution, str) else json.dumps(solution, default=str)
    return messages + [Message("assistant", [Part("text", text=text)] if text else [])]


def prompt_columns(record: dict) -> str:
    """The columns of a `prompt` record the rewards get (all but PROMPT_KEYS), as JSON text."""
    return json.dumps({k: v for k, v in record.items() if k not in PROMPT_KEYS}, default=str, sort_keys=True)


_PARSERS = {"messages": _parse_messages, "sharegpt": _parse_sharegpt,
            "text": _parse_text, "instruction": _parse_instruction, "prompt": _parse_prompt}


# -- pieces ---------------------------------------------------------------------------------

def _role(value, i: int) -> str:
    role = _ROLES.get(value.lower()) if isinstance(value, str) else None
    if role is None:
        raise BadRecord("wrong_shape", f"message {i} has role {value!r}; expected system, user, assistant or tool")
    return role


def _check_chat(messages: list[Message]) -> None:
    """A sample needs something from the user and an assistant answer at the end: text, or
    tool calls (which then need no response)."""
    if not any(m.role == "user" and _has_content(m) for m in messages):
        raise BadRecord("no_user_turn", "no user message with content")
    last = messages[-1]
    if last.role == "assistant" and not (last.text().strip() or last.tool_calls):
        raise BadRecord("no_answer", "the assistant's answer (the last message) is empty")
    if last.role != "assistant":
        raise BadRecord("no_answer", f"the last message is from {last.role!r}; a sample ends with the "
                        "assistant's answer")


def _has_content(m: Message) -> bool:
    return any(p.type != "text" or (p.text or "").strip() for p in m.parts)


def _first_str(record: dict, *keys: str) -> str | None:
    """The first of `keys` that is present and not null; it must be a string."""
    for key in keys:
        value = record.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise BadRecord("wrong_shape", f"'{key}' is a {type(value).__name__}, not text")
            return value
    return None


def _media_values(record: dict, *keys: str) -> list:
    """A media column: one reference or a list of them (null / missing = none)."""
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            return value
        if isinstance(value, (str, dict, bytes)):
            return [value]
        raise BadRecord("wrong_shape", f"'{key}' is a {type(value).__name__}, not a media reference or list")
    return []


def _content_part(part, i: int, pending: dict[str, deque]) -> Part:
    if not isinstance(part, dict):
        raise BadRecord("wrong_shape", f"message {i} has a content part that is a {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise BadRecord("wrong_shape", f"message {i} has a text part without a 'text' string")
        return Part("text", text=part["text"])
    if kind in ("image", "audio"):
        for key in ("path", "url", "base64", kind):
            if part.get(key) is not None:
                return _media_part(kind, part[key], base64_text=key == "base64")
        if not pending[kind]:
            raise BadRecord("placeholder_mismatch", f"message {i} has an {kind} part but no {kind} is left to fill it")
        return _media_part(kind, pending[kind].popleft())
    if kind in ("image_url", "audio_url"):  # OpenAI / vLLM: {"image_url": {"url": ...}} or a plain string
        ref = part.get(kind)
        media_kind = "image" if kind == "image_url" else "audio"
        return _media_part(media_kind, ref.get("url") if isinstance(ref, dict) else ref)
    if kind == "input_audio":  # OpenAI: {"input_audio": {"data": <base64>, "format": "wav"}}
        ref = part.get("input_audio")
        return _media_part("audio", ref.get("data") if isinstance(ref, dict) else None, base64_text=True)
    if isinstance(kind, str):
        raise BadRecord("unknown_part", f"message {i} has a part of type {kind!r}")
    raise BadRecord("wrong_shape", f"message {i} has a content part without a 'type'")


def _media_part(kind: str, value, *, base64_text: bool = False) -> Part:
    """Any media reference → a Part with `ref_kind` path | url | base64."""
    if isinstance(value, bytes) and value:
        return Part(kind, ref=base64.b64encode(value).decode("ascii"), ref_kind="base64")
    if isinstance(value, dict):  # a Hugging Face Image/Audio cell: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return _media_part(kind, value["bytes"])
        ref = value.get("path") or value.get("url")
        if isinstance(ref, str):
            return _media_part(kind, ref)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("wrong_shape", f"an {kind} reference must be a non-empty string, got {type(value).__name__}")
    if value.startswith("data:"):
        head, comma, payload = value.partition(",")
        if not comma or not head.endswith(";base64"):
            raise BadRecord("wrong_shape", f"an {kind} data: URL that is not base64")
        return Part(kind, ref=payload, ref_kind="base64")
    if base64_text:
        return Part(kind, ref=value, ref_kind="base64")
    if value[:8].lower().startswith(("http://", "https://")):
        return Part(kind, ref=value, ref_kind="url")
    return Part(kind, ref=value.removeprefix("file://"), ref_kind="path")


def _split_placeholders(value: str, media: dict[str, deque]) -> list[Part]:
    """'<image>\\nWhat is this?' → [image, text]: placeholders take the listed media in order."""
    pieces = _PLACEHOLDER.split(value)  # text, kind, text, kind, ..., text
    if len(pieces) == 1:
        return [Part("text", text=value)] if value else []
    parts = []
    for j, piece in enumerate(pieces):
        if j % 2:
            parts.append(_media_part(piece, media[piece].popleft()))
        elif piece.strip("\n"):  # the newline that sets a placeholder apart is layout, not text
            parts.append(Part("text", text=piece.strip("\n")))
    return parts
