"""The one canonical sample type, independent of any model.

Every source format (messages, sharegpt, text, instruction) is parsed into a `Conversation`;
only `data_tools.chat_text` / `data_tools.render` know how a particular model turns it into
tokens. Assistant turns may carry a reasoning trace and tool calls, `tool` turns answer them,
and the conversation holds the function declarations offered (OpenAI layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
PartType = Literal["text", "image", "audio"]


@dataclass
class Part:
    type: PartType
    text: str | None = None
    # For media: a path (absolute, or relative to `base_dir`), an http(s) URL, or base64 data.
    ref: str | None = None
    ref_kind: Literal["path", "url", "base64"] | None = None


@dataclass
class ToolCall:
    """One function call an assistant turn makes (OpenAI / Hugging Face `tool_calls`)."""

    name: str
    arguments: dict  # parsed: a JSON-string `arguments` is decoded when the record is read
    id: str | None = None


@dataclass
class Message:
    role: Role
    parts: list[Part]
    # Assistant turns: the reasoning trace written before the answer (`reasoning_content`,
    # `reasoning` or `thinking` in the record), and the calls this turn makes.
    thinking: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    # Tool turns: which call this answers (either may be missing, not both).
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        return "".join(p.text or "" for p in self.parts if p.type == "text")


@dataclass
class Conversation:
    messages: list[Message]
    # Where it came from, for messages and rejects: "data/train.jsonl:17".
    origin: str = "<memory>"
    base_dir: str = "."
    # "chat" trains on assistant turns; "text" (continued pre-training) trains on everything.
    kind: Literal["chat", "text", "prompt"] = "chat"  # prompt: a prompt record (its answer turn may be empty)
    dataset: str = ""
    # Function declarations offered to the model (OpenAI `{"type": "function", "function": {...}}`).
    tools: list[dict] = field(default_factory=list)
    # The record as read, kept so a reject can be written back out verbatim.
    raw: dict | None = field(default=None, repr=False)
    # What decoding its media changed on purpose ("cut_audio", "resample_audio"), set by
    # `data_tools.media.load_media` and counted in the stats' overflow_actions.
    media_actions: list[str] = field(default_factory=list)

    def modality(self) -> str:
        """text | image | audio | mixed: which media this sample carries."""
        kinds = {p.type for m in self.messages for p in m.parts if p.type != "text"}
        if not kinds:
            return "text"
        if len(kinds) > 1:
            return "mixed"
        return kinds.pop()

    def media(self) -> list[Part]:
        return [p for m in self.messages for p in m.parts if p.type in ("image", "audio")]


class BadRecord(Exception):
    """A record that cannot become a sample. `reason` is a short stable key for counting."""

    def __init__(self, reason: str, detail: str, origin: str = "", *, raw: object = None):
        self.reason = reason
        self.detail = detail
        self.origin = origin
        # What was read (a dict, or the text of an unparseable line), for rejects.jsonl.
        self.raw = raw
        super().__init__(f"{origin}: {detail}" if origin else detail)

    def __reduce__(self):
        # Exceptions pickle as cls(*args); ours has more fields. Needed across worker processes.
        return (BadRecord, (self.reason, self.detail, self.origin), {"raw": self.raw})


# Stable reason keys, counted in stats and written to rejects.jsonl.
REASONS = (
    "unparseable",        # a line/row that is not valid JSON/data
    "wrong_shape",        # valid data, but not the declared format
    "missing_media",      # a media file that does not exist
    "corrupt_media",      # exists but cannot be decoded (or is empty / not media)
    "media_too_large",    # over the byte, pixel or duration caps (reject policy)
    "network_media",      # a URL while network media is off, or a failed fetch
    "unknown_part",       # a content part type we do not know
    "no_user_turn",       # a chat with nothing from the user
    "no_answer",          # a missing or empty assistant answer: nothing to learn
    "same_answers",       # a preference pair whose chosen and rejected answers are equal
    "prompt_mismatch",    # a preference pair whose two sides have different prompts
    "placeholder_mismatch",  # <image>/<audio> placeholders vs listed media
    "over_budget",        # longer than max_seq_len under overflow: drop
    "render_failed",      # the processor refused the sample
    "unanswered_call",    # a tool call that no tool message answers before the conversation moves on
    "orphan_response",    # a tool message that answers no call
    "bad_arguments",      # tool-call arguments that are not a JSON object
    "undeclared_tool",    # a call to a function the record's `tools` do not declare
)
