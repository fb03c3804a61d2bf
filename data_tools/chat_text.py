"""Conversation → the text a model trains on, and which of its tokens carry labels, through the
model's own chat template.

Every labelled part is what the model writes when it is served:
- the last answer continues the served prompt (the template with `add_generation_prompt=True`).
  With thinking off that prompt ends in the empty thought scaffold and the answer follows it;
  with thinking on it ends at the model-turn header and the model writes its trace itself:
  `<|channel>thought\\n{trace}<channel|>{answer}`. An answer ends with the end-of-turn token;
  a turn of tool calls ends with the token that hands over to the tools (`<|tool_response>`),
  where generation stops too.
- every earlier step (`train_on: assistant`: an answer, a turn of calls, parallel calls) is
  trained exactly as it is served too: after `apply_chat_template(messages[:k], tools,
  add_generation_prompt=True)` and labelled with what the model writes there, its thought
  included. The history is not that: templates drop the empty scaffold and earlier thoughts from
  rendered model turns. So a sample is one main row (the last step as served) whose tokens carry
  the labels of every step that is a token prefix of it, plus, for each step that is not, a
  branch: the step's tokens after the last one it shares with the main row, which the branch
  repeats (unlabelled) so that its first written token is predicted from the same logits as in
  its own sequence. `data_tools.steps` lays branches into one row (position ids continue from the
  branch point; the mask lets a branch see only its own path). Tool responses, declarations,
  system and user turns carry no label.

Content goes to the template the way servers send it: text-only content as one string (the
official Gemma 4 template prints a list-valued system content as its Python repr), media turns
as lists of parts, tool-call arguments as objects. Templates that do not read OpenAI `tool`
messages get them folded into the calling turn, as llama.cpp serves them
(`data_tools.tools.fold_tool_responses`).

`data.thinking`: `on` renders every sample with thinking on, `off` drops every trace (a model
served with thinking off never writes one), `auto` turns it on for samples that carry a trace.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_tools.conversation import BadRecord, Conversation
from data_tools.tools import fold_tool_responses

IGNORE = -100


@dataclass(frozen=True)
class ChatFormat:
    """The chat-format tokens rendering needs beyond the template itself; each model family
    supplies its own (`finetune.model.families`), so nothing here is specific to one model."""

    turn_end: str          # ends every turn: generation stops there, labels run through it
    model_turn: str        # opens an assistant turn in the rendered history
    channel_open: str      # opens a thinking channel (never generated with thinking off)
    channel_close: str     # closes it
    thought: str = "thought\n"  # the channel's name, written after channel_open
    call_open: str = ""    # opens one tool call ("" = the family has no tool-call format)
    call_close: str = ""   # closes it
    call_stop: str = ""    # ends a turn of calls: the tools answer next, generation stops there
    quote: str = ""        # delimits strings inside calls


# Rendered through the tokenizer and the processor at start-up; the fast path is used only
# when they agree.
_PROBE = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "image"}, {"type": "audio"},
                                       {"type": "text", "text": "Hi?"}]},
          {"role": "assistant", "content": "Yes."},
          {"role": "user", "content": "And?"}]
# Does the template read OpenAI `tool` messages? (The content must land after the call stop.)
_TOOL_PROBE = [{"role": "user", "content": "u"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "p", "type": "function", "function": {"name": "probe", "arguments": {}}}]},
               {"role": "tool", "tool_call_id": "p", "content": "PROBE_RESULT"}]


def split_thought(text: str, chat: ChatFormat) -> tuple[str | None, str]:
    """`<|channel>thought\\n…<channel|>answer` → (trace, answer); (None, text) without a channel."""
    if chat.channel_open not in text or chat.channel_close not in text:
        return None, text
    head, _, rest = text.partition(chat.channel_open)
    trace, _, answer = rest.partition(chat.channel_close)
    trace = trace.removeprefix(chat.thought).strip()
    return trace or None, (head + answer).strip()


@dataclass
class Branch:
    """An earlier step served apart: `ids` continue the main row after its token `at - 1`
    (`ids[0]` repeats main token `at`, unlabelled), `labels` on what the model writes there."""

    at: int
    ids: list[int]
    labels: list[int]


@dataclass
class Rendered:
    """One conversation: the main row (the last step as served) and the branches of earlier steps."""

    text: str
    ids: list[int]
    labels: list[int]
    branches: list[Branch]


class ChatText:
    """Conversations → (text, unexpanded token ids, labels) for one processor's chat template."""

    def __init__(self, processor, chat: ChatFormat, *, train_on: str, thinking: str, encode, media_ids):
        self.processor = processor
        self.tok = processor.tokenizer
        self.chat = chat
        self.train_on = train_on
        self.thinking = thinking
        self.encode = encode
        self.media_ids = media_ids
        ids = self.tok.convert_tokens_to_ids
        self.eot_id = ids(chat.turn_end)
        self.stop_ids = {self.eot_id} | ({ids(chat.call_stop)} if chat.call_stop else set())
        self._reads_tool_messages: bool | None = None
        # The processor's template call re-validates its kwargs each time (~5× slower than
        # rendering the same template through the tokenizer).
        self.fast_template = False
        slow = [self.template(_PROBE, gen) for gen in (False, True)]
        self.fast_template = True
        try:
            self.fast_template = [self.template(_PROBE, gen) for gen in (False, True)] == slow
        except Exception:  # any template the tokenizer path can't render: stay on the processor
            self.fast_template = False

    # ------------------------------------------------------------------ the template

    def template(self, msgs: list[dict], gen: bool, *, tools: list[dict] | None = None,
                 thinking: bool = False) -> str:
        """The chat template applied to `msgs` (`gen`: with the generation prompt)."""
        kw = {}
        if tools:
            kw["tools"] = tools
        if thinking:
            kw["enable_thinking"] = True
        if self.fast_template:
            return self.tok.apply_chat_template(msgs, chat_template=self.processor.chat_template,
                                                tokenize=False, add_generation_prompt=gen, **kw)
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)

    def render(self, msgs: list[dict], gen: bool, tools: list[dict], thinking: bool, origin: str) -> str:
        """`template` on OpenAI-layout messages, in the layout this template reads."""
        if any(m["role"] == "tool" for m in msgs) and not self.reads_tool_messages():
            msgs = fold_tool_responses(msgs)
        try:
            return self.template(msgs, gen, tools=tools, thinking=thinking)
        except Exception as e:  # the template's own raise_exception, or anything it chokes on
            raise BadRecord("render_failed", f"the chat template refused the conversation: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", origin) from None

    def reads_tool_messages(self) -> bool:
        if self._reads_tool_messages is None:
            try:
                text = self.template(_TOOL_PROBE, False)
                stop = text.find(self.chat.call_stop) if self.chat.call_stop else -1
                self._reads_tool_messages = 0 <= stop < text.find("PROBE_RESULT")
            except Exception:
                self._reads_tool_messages = False
        return self._reads_tool_messages

    def messages(self, conv: Conversation, thinking: bool) -> list[dict]:
        """Our messages → the OpenAI-layout dicts chat templates read (media objects passed apart)."""
        out = []
        for m in conv.messages:
            media = any(p.type != "text" for p in m.parts)
            if media and m.role == "system":
                raise BadRecord("render_failed", "the system message carries media; the chat template "
                                "takes text only there", conv.origin)
            content = [{"type": p.type, "text": p.text or ""} if p.type == "text" else {"type": p.type}
                       for p in m.parts] if media else m.text()
            d = {"role": m.role, "content": content}
            if m.tool_calls:
                d["tool_calls"] = [{**({"id": c.id} if c.id is not None else {}), "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments}}
                                   for c in m.tool_calls]
                if not m.parts:
                    d["content"] = None
            if thinking and m.thinking:
                d["reasoning_content"] = m.thinking
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
            out.append(d)
        return out

    def thinking_for(self, conv: Conversation) -> bool:
        if self.thinking != "auto":
            return self.thinking == "on"
        return any(m.role == "assistant" and (m.thinking or split_thought(m.text(), self.chat)[0])
                   for m in conv.messages)

    def prompt_text(self, conv: Conversation, thinking: bool = False) -> str:
        """What a server sends the model: everything before the last answer + generation prompt."""
        msgs = self.messages(conv, thinking)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return self.render(msgs, True, conv.tools, thinking, conv.origin)

    def answer_text(self, conv: Conversation, thinking: bool = False) -> str:
        """The last answer as the model writes it after `prompt_text`: thought, text, calls and the
        stop token, in the template's own syntax (what GRPO's raw-text rewards compare with)."""
        msgs = self.messages(conv, thinking)
        return self._written(conv, msgs, len(conv.messages) - 1, thinking)

    # ------------------------------------------------------------------ text + labels

    def text_and_labels(self, conv: Conversation) -> tuple[str, list[int], list[int]]:
        """The training text, its unexpanded token ids, and labels (IGNORE where no loss), without
        the branches of earlier steps (`rendered` has them)."""
        r = self.rendered(conv)
        return r.text, r.ids, r.labels

    def rendered(self, conv: Conversation) -> Rendered:
        """The conversation as the last step is served (text, ids, labels), plus a branch for each
        earlier step whose served prompt is not a prefix of it (module doc)."""
        tok = self.tok
        if conv.kind == "text":
            text = tok.bos_token + conv.messages[0].text() + tok.eos_token
            ids = self.encode(text)
            return Rendered(text, ids, [IGNORE] + ids[1:], [])

        thinking = self.thinking_for(conv)
        msgs = self.messages(conv, thinking)
        last = len(msgs) - 1
        if msgs[last]["role"] != "assistant":
            raise BadRecord("no_answer", "the conversation does not end with an assistant answer",
                            conv.origin)
        if not any(m["role"] == "user" for m in msgs[:last]):
            raise BadRecord("no_user_turn", "nothing from the user before the answer", conv.origin)
        prompt, written, ids, labels = self._step(conv, msgs, last, thinking)
        text = prompt + written
        if written.endswith(self.chat.turn_end):  # the template's newline after the turn, unlabelled
            text += "\n"
            step, ids = ids, self.encode(text)
            if ids[: len(step)] != step:
                raise BadRecord("render_failed", "the end of the turn merges with the newline after it",
                                conv.origin)
            labels = labels + [IGNORE] * (len(ids) - len(step))
        if self.train_on == "all":
            labels = [i if i not in self.media_ids else IGNORE for i in ids]
            labels[0] = IGNORE
            return Rendered(text, ids, labels, [])
        branches = []
        if self.train_on == "assistant":
            for i in range(last):
                if self._is_step(msgs, i):
                    branches += self._branch(conv, msgs, i, thinking, ids, labels)
        # Deepest branch point first: the order in which positions alone define the tree.
        branches.sort(key=lambda b: -b.at)
        return Rendered(text, ids, labels, branches)

    @staticmethod
    def _is_step(msgs: list[dict], i: int) -> bool:
        """Only answers are steps: an assistant turn before any user turn, or an empty one, is context."""
        m = msgs[i]
        return m["role"] == "assistant" and any(x["role"] == "user" for x in msgs[:i]) \
            and bool(m.get("tool_calls") or _text(m).strip())

    def _step(self, conv, msgs, i, thinking) -> tuple[str, str, list[int], list[int]]:
        """Step `i` as served: (served prompt, what the model writes, ids, labels on the written part)."""
        prompt = self.render(msgs[:i], True, conv.tools, thinking, conv.origin)
        written = self._written(conv, msgs, i, thinking)
        ids, prompt_ids = self.encode(prompt + written), self.encode(prompt)
        n = len(prompt_ids)
        if ids[:n] != prompt_ids:
            raise BadRecord("render_failed", "the generation prompt is not a token prefix of the "
                            "rendered step (the answer merges with the prompt's last token)", conv.origin)
        if ids[-1] not in self.stop_ids:
            raise BadRecord("render_failed", "the step does not end in its stop token once tokenized",
                            conv.origin)
        return prompt, written, ids, [IGNORE] * n + ids[n:]

    def _branch(self, conv, msgs, i, thinking, ids, labels) -> list[Branch]:
        """Step `i` against the main row: labelled there when it is a token prefix of it, else a
        branch from its served prompt's last shared token, which the branch repeats (so the loss
        of its first written token is computed from that token's logits, as in its own sequence)."""
        _, _, step, step_labels = self._step(conv, msgs, i, thinking)
        n = next((k for k, (a, b) in enumerate(zip(step, ids)) if a != b), min(len(step), len(ids)))
        if n == len(step):  # served as the conversation has it: label it there
            labels[:n] = [b if b != IGNORE else a for a, b in zip(labels[:n], step_labels)]
            return []
        # A step lies wholly in the main row or wholly in its branch (even where the main row
        # shares the start of what it writes): each step reads as one run of labels.
        n = min(n, next(k for k, x in enumerate(step_labels) if x != IGNORE))
        if n == 0:
            raise BadRecord("render_failed", f"step {i} shares no token with the conversation", conv.origin)
        branch = Branch(n - 1, step[n - 1:], [IGNORE] + step_labels[n:])
        if self.media_ids & set(branch.ids):
            raise BadRecord("render_failed", f"the served prompt of step {i} differs from the "
                            "conversation before a media part", conv.origin)
        return [branch]

    def _written(self, conv: Conversation, msgs: list[dict], i: int, thinking: bool) -> str:
        """Answer `i` as the model writes it: [thought channel] text [calls + call stop | turn end]."""
        chat, m = self.chat, conv.messages[i]
        trace, answer = split_thought(m.text(), chat)
        trace = (m.thinking or trace) if thinking else None
        head = chat.channel_open + chat.thought + trace + chat.channel_close if trace else ""
        if not m.tool_calls:
            if not answer and conv.kind != "prompt":  # a prompt record's answer turn may be empty
                raise BadRecord("no_answer", "the assistant answer is empty", conv.origin)
            return head + answer + chat.turn_end
        if not chat.call_stop:
            raise BadRecord("render_failed", "this model family has no tool-call format", conv.origin)
        return head + answer + self._calls_text(conv, msgs[: i + 1]) + chat.call_stop

    def _calls_text(self, conv: Conversation, msgs: list[dict]) -> str:
        """The last turn's calls as the template writes them (its argument syntax is its own)."""
        bare = {k: v for k, v in msgs[-1].items() if k not in ("reasoning_content", "content")}
        bare["content"] = None
        before = self.render(msgs[:-1], False, conv.tools, False, conv.origin)
        through = self.render(msgs[:-1] + [bare], False, conv.tools, False, conv.origin)
        new = through[len(before):] if through.startswith(before) else ""
        i, j = new.find(self.chat.call_open), new.rfind(self.chat.call_close)
        if i < 0 or j < i:
            raise BadRecord("render_failed", "the chat template does not render the tool calls", conv.origin)
        return new[i: j + len(self.chat.call_close)]


def _text(m: dict) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    return "".join(p.get("text", "") for p in c or [])
