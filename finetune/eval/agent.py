"""Tool-use items as an agent loop: generate, read the calls, answer them, feed them back, score.

The model generates, its calls are read in the official call syntax, answered, and fed back as
the chat template serves them, until it answers.

An item is a recorded conversation with `tools` and tool calls. The loop starts after its last
user turn (everything before is context, as recorded). At step k the model sees the served prompt
of what has happened so far (its own earlier calls and the responses they got); a step that
writes calls is answered from the item's recorded tool responses (the recorded call with the same
name and arguments), or by a Python function `module:function(name, arguments) -> str` named in
`eval.tool_responder`; a step that writes no call is the final answer. Scores per item:
`call_accuracy` — the reference's call steps matched exactly (same calls, any order, at the same
step) over their number — and `final_exact` — the final answer equals the reference's, after
normalisation (the `match` given: finetune.eval.evaluate passes its exact_match).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

from data_tools.chat_text import split_thought
from data_tools.conversation import Conversation, Message, Part, ToolCall
from finetune.errors import UserError

Responder = Callable[[str, dict], str]


def is_agent_item(conv: Conversation) -> bool:
    """A conversation with declared tools whose model turns call them."""
    return bool(conv.tools) and any(m.tool_calls for m in conv.messages)


def _start(conv: Conversation) -> int:
    """Index of the first message after the last user turn: where the agent takes over."""
    return max(i for i, m in enumerate(conv.messages) if m.role == "user") + 1


def _key(name: str, arguments: dict) -> str:
    return json.dumps([name, arguments], sort_keys=True)


def reference_steps(conv: Conversation) -> list[Message]:
    """The recorded assistant steps the agent is compared with."""
    return [m for m in conv.messages[_start(conv):] if m.role == "assistant"]


def recorded_responder(conv: Conversation) -> Responder:
    """Answers a call with the recorded response to the same call (by name and arguments); a call
    the record never made gets an error message, as a real tool would."""
    answers: dict[str, str] = {}
    msgs = conv.messages
    for i, m in enumerate(msgs):
        replies = [r for r in msgs[i + 1:i + 1 + len(m.tool_calls)] if r.role == "tool"]
        for k, call in enumerate(m.tool_calls):
            reply = next((r for r in replies if call.id is not None and r.tool_call_id == call.id),
                         replies[k] if k < len(replies) else None)
            if reply is not None:
                answers.setdefault(_key(call.name, call.arguments), reply.text())
    return lambda name, arguments: answers.get(_key(name, arguments), f"error: no recorded response for {name}")


def python_responder(spec: str) -> Responder:
    """`module:function` → that function, called as function(name, arguments) -> str."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError("eval.tool_responder", f"cannot import {spec}: {e}",
                        "Name a function as module:function on the Python path") from None
    return lambda tool, arguments: str(fn(tool, arguments))


def _same_calls(got: list[dict] | None, want: list[ToolCall]) -> bool:
    if not got:
        return False
    return sorted(_key(c["name"], c["arguments"]) for c in got) == sorted(_key(c.name, c.arguments) for c in want)


def _answer_text(raw: str, chat) -> str:
    """The visible answer in a raw generation: no thought channel, no calls, no stop tokens."""
    _, answer = split_thought(raw, chat)
    for stop in (chat.call_open, chat.turn_end, chat.call_stop, "<eos>"):
        if stop:
            answer = answer.split(stop)[0]
    return answer.strip()


def run_agent(conv: Conversation, generate: Callable[[Conversation], str], chat, responder: Responder,
              match: Callable[[str, str], float], max_steps: int | None = None) -> dict:
    """One item: `generate(conversation so far) -> raw text` in a loop (module doc); `match(answer,
    reference)` scores the final answer."""
    from finetune.model.generate import read_calls

    reference = reference_steps(conv)
    state = Conversation(list(conv.messages[:_start(conv)]), origin=conv.origin, tools=conv.tools,
                         base_dir=conv.base_dir)
    steps, final = [], None
    for k in range(max_steps or len(reference) + 2):
        raw = generate(state)
        calls = read_calls(raw, chat)
        want = reference[k] if k < len(reference) else None
        step = {"raw": raw, "calls": calls, "expected_calls": [{"name": c.name, "arguments": c.arguments}
                                                               for c in want.tool_calls] if want else []}
        if want is not None and want.tool_calls:
            step["correct"] = _same_calls(calls, want.tool_calls)
        steps.append(step)
        if not calls:  # no call (or an unreadable one): the answer
            final = _answer_text(raw, chat)
            break
        made = [ToolCall(c["name"], c["arguments"], id=f"call_{k}_{j}") for j, c in enumerate(calls)]
        state.messages.append(Message("assistant", [], tool_calls=made))
        state.messages += [Message("tool", [Part("text", responder(c.name, c.arguments))], tool_call_id=c.id,
                                   name=c.name) for c in made]
    call_steps = [s for s in steps if "correct" in s]
    n_calls = sum(1 for m in reference if m.tool_calls)
    want_final = reference[-1].text().strip() if reference and not reference[-1].tool_calls else None
    return {"steps": steps, "final": final, "reference": want_final,
            "call_accuracy": sum(s["correct"] for s in call_steps) / n_calls if n_calls else None,
            "final_exact": match(final or "", want_final) if want_final is not None else None}


def summarize(results: list[dict]) -> dict:
    """Mean call accuracy and final-answer exact match over items (those that have each)."""
    def mean(key):
        vals = [r[key] for r in results if r[key] is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    return {"n": len(results), "call_accuracy": mean("call_accuracy"), "final_exact": mean("final_exact")}


def agent_eval(model, processor, chat, items, *, responder_spec: str | None, max_new_tokens: int,
               image_tokens: int, thinking, match: Callable[[str, str], float]) -> tuple[dict, list[dict]]:
    """(summary, per-item results) of the agent loop over `items` (EvalItems) with one model."""
    from finetune.model.generate import generate, wants_thinking

    results = []
    for it in items:
        think = wants_thinking(thinking, it.conv, chat)
        responder = python_responder(responder_spec) if responder_spec else recorded_responder(it.conv)

        def gen(state, it=it, think=think):
            return generate(model, processor, chat, state, it.images, it.audios, max_new_tokens=max_new_tokens,
                            image_tokens=image_tokens, thinking=think, raw=True)
        results.append({"id": it.id, **run_agent(it.conv, gen, chat, responder, match)})
    return summarize(results), results
