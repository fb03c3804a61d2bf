"""Preference records in TRL's layouts → one sample: the prompt once, both answers as tokens.

`format: preference` reads what TRL's DPO/ORPO/KTO trainers read:
- paired, explicit prompt: `{"prompt", "chosen", "rejected"}`, each either conversational (a
  list of messages; each answer one assistant message) or plain text (a user prompt and two
  answers);
- paired, implicit prompt: `{"chosen": [...], "rejected": [...]}`, two whole conversations that
  differ only in the last (assistant) message;
- unpaired (KTO): `{"prompt", "completion", "label"}` with `label` true (desirable) or false.
Media are content parts of the prompt (`{"type": "image", "path": ...}`, or bare
`{"type": "image"}` placeholders filled in order from the `images`/`image` and
`audios`/`audio` columns); with columns but no media parts, they go before the first user
turn's text, as TRL does. Answers are text.

Both answers are rendered as the continuation of the served generation prompt, exactly as SFT
labels are (`data_tools.render`), with loss on the final answer only. A stored sample is the
prompt + chosen answer (`input_ids`, `labels`, `mm_token_type_ids`, media), plus
`rejected_ids` (the rejected answer's tokens, which follow the same prompt) for a pair, or
`desirable` (1/0) for an unpaired record. Overflow handling sees the longer answer.

Bad pairs are `BadRecord`s counted and written to rejects.jsonl like any other: a missing or
empty side (`no_answer`), chosen equal to rejected (`same_answers`), prompts that differ between
the sides (`prompt_mismatch`), anything else malformed (`wrong_shape`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from data_tools.conversation import BadRecord, Conversation
from data_tools.render import IGNORE, Renderer, RenderSettings

_MEDIA_PARTS = {"image", "audio", "image_url", "audio_url", "input_audio"}
_COLUMNS = {"images": ("images", "image"), "audios": ("audios", "audio")}


@dataclass
class PreferenceRecord:
    chosen: Conversation  # prompt + chosen answer (unpaired: prompt + completion)
    rejected: Conversation | None  # prompt + rejected answer; None when unpaired
    desirable: bool | None = None  # the unpaired record's label


# ---------------------------------------------------------------- parsing


def parse_preference(record, origin: str, base_dir: str) -> PreferenceRecord:
    """One record in any of TRL's preference layouts; raises `BadRecord`."""
    try:
        if not isinstance(record, dict):
            raise BadRecord("wrong_shape", f"a {type(record).__name__}, not an object")
        return _parse(record, origin, base_dir)
    except BadRecord as bad:
        raise BadRecord(bad.reason, bad.detail, origin, raw=record) from None


def _parse(record: dict, origin: str, base_dir: str) -> PreferenceRecord:
    media = {ours: next((record[k] for k in keys if record.get(k) is not None), None)
             for ours, keys in _COLUMNS.items()}
    if "completion" in record or "label" in record:
        label = record.get("label")
        if not isinstance(label, bool) and label not in (0, 1):
            raise BadRecord("wrong_shape", f"'label' must be true or false, got {label!r}")
        prompt, (completion,) = _split(record, ("completion",))
        conv = _conversation(prompt, completion, media, origin, base_dir, "completion")
        return PreferenceRecord(conv, None, bool(label))
    if "chosen" not in record and "rejected" not in record:
        raise BadRecord("wrong_shape", "no chosen/rejected (paired) or completion/label (unpaired) "
                        "fields (map yours with `columns`)")
    prompt, (chosen, rejected) = _split(record, ("chosen", "rejected"))
    c = _conversation(prompt, chosen, media, origin, base_dir, "chosen")
    r = _conversation(prompt, rejected, media, origin, base_dir, "rejected")
    if c.messages[-1].text().strip() == r.messages[-1].text().strip():
        raise BadRecord("same_answers", "the chosen and rejected answers are the same: nothing to prefer")
    return PreferenceRecord(c, r)


def _split(record: dict, sides: tuple[str, ...]) -> tuple[list, list[dict]]:
    """(prompt messages, one assistant message per side), from an explicit or implicit prompt."""
    for side in sides:
        value = record.get(side)
        if value is None or value == "" or value == []:
            raise BadRecord("no_answer", f"the {side} answer is missing or empty")
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadRecord("no_user_turn", "the prompt is empty")
            prompt = [{"role": "user", "content": prompt}]
        elif not isinstance(prompt, list) or not prompt:
            raise BadRecord("wrong_shape", "'prompt' must be text or a non-empty list of messages")
        return prompt, [_answer(record[s], s) for s in sides]
    # Implicit prompt (TRL's extract_prompt): whole conversations sharing all but the last turn.
    convs = [record[s] for s in sides]
    if not all(isinstance(c, list) and c for c in convs):
        raise BadRecord("wrong_shape", "no 'prompt': the sides must be whole conversations "
                        "(lists of messages), or add a 'prompt' field")
    prompts = [c[:-1] for c in convs]
    if any(json.dumps(p, sort_keys=True, default=str) != json.dumps(prompts[0], sort_keys=True, default=str)
           for p in prompts[1:]):
        raise BadRecord("prompt_mismatch", "the chosen and rejected conversations differ before "
                        "their last message: the prompt must be the same on both sides")
    if not prompts[0]:
        raise BadRecord("no_user_turn", "each side is a single message: there is no prompt")
    return prompts[0], [_answer([c[-1]], s) for c, s in zip(convs, sides)]


def _answer(value, side: str) -> dict:
    """One side → one assistant message with text content."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        raise BadRecord("wrong_shape", f"the {side} side must be text or one assistant message")
    msg = value[0]
    content = msg.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in _MEDIA_PARTS
                                         for p in content):
        raise BadRecord("wrong_shape", f"the {side} answer holds media: media belong in the prompt")
    return msg


def _conversation(prompt: list, answer: dict, media: dict, origin: str, base_dir: str,
                  side: str) -> Conversation:
    from data_tools.formats import parse_record

    msgs = list(prompt)
    if any(media.values()) and not any(_has_media(m) for m in msgs):
        msgs = _media_first(msgs, media)
    try:
        # The messages layout checks the rest: a user turn, a non-empty final assistant answer.
        return parse_record({"messages": msgs + [answer], **media}, "messages", origin, base_dir)
    except BadRecord as bad:
        if bad.reason == "no_answer":
            raise BadRecord("no_answer", f"the {side} side: {bad.detail}") from None
        raise


def _has_media(message) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in _MEDIA_PARTS
                                             for p in content)


def _media_first(msgs: list, media: dict) -> list:
    """Placeholders for the media columns before the first user turn's text (TRL's
    `prepare_multimodal_messages` puts them there too)."""
    def count(value) -> int:
        return len(value) if isinstance(value, list) else int(value is not None)

    holders = [{"type": "image"}] * count(media["images"]) + [{"type": "audio"}] * count(media["audios"])
    out = []
    placed = False
    for m in msgs:
        if not placed and isinstance(m, dict) and m.get("role") in ("user", "human"):
            content = m.get("content")
            text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            m = {**m, "content": holders + text}
            placed = True
        out.append(m)
    return out


def preferred_conversation(record, origin: str, base_dir: str) -> Conversation:
    """The prompt and its preferred answer (a pair's chosen side, a desirable completion): the
    reference a greedy answer is scored against."""
    pref = parse_preference(record, origin, base_dir)
    if pref.desirable is False:
        raise BadRecord("no_answer", "an undesirable completion is no reference answer", origin)
    return pref.chosen


# ---------------------------------------------------------------- rendering


def answer_span(labels) -> tuple[int, int]:
    """[start, stop) of the labelled answer (the last-answer-only labels are one span)."""
    idx = [k for k, x in enumerate(labels) if x != IGNORE]
    if not idx:
        return len(labels), len(labels)
    return idx[0], idx[-1] + 1


class PreferenceWorker:
    """Renders the preference records of a chunk for a `RecordWorker` (`worker`): its data
    caps and processor, with labels on the final answer only."""

    def __init__(self, worker):
        from data_tools.media import load_media

        self.worker = worker
        self.load_media = load_media
        base = worker.renderer
        s = base.s
        self.renderer = Renderer(base.processor, RenderSettings(
            max_seq_len=s.max_seq_len, train_on="last_assistant", image_tokens=s.image_tokens,
            overflow=s.overflow), base.chat)

    def __call__(self, items: list) -> list[dict]:
        """One result per item, in order; items of other formats go back to the worker."""
        out: list = [None] * len(items)
        plain = [k for k, it in enumerate(items) if it[3] != "preference"]
        if plain:
            for k, r in zip(plain, self.worker([items[k] for k in plain])):
                out[k] = r
        todo = []
        for k, item in enumerate(items):
            if out[k] is not None:
                continue
            try:
                todo.append((k, *self._prepare(item)))
            except BadRecord as e:
                out[k] = reject(e, item)
        rendered = self.renderer.render_many([(main, imgs, auds) for _, _, main, imgs, auds, _ in todo])
        for (k, pref, main, _, _, pre), r in zip(todo, rendered):
            try:
                if isinstance(r, BadRecord):
                    raise r
                sample = self._assemble(pref, main, r, pre)
            except BadRecord as e:
                out[k] = reject(e, items[k])
                continue
            sample.update(modality=pref.chosen.modality(), origin=items[k][0], dataset=items[k][4],
                          media_actions=list(pref.chosen.media_actions))
            out[k] = sample
        return out

    def _prepare(self, item):
        """(the pair, the side rendered in full, images, audios, {side: (prompt ids, answer ids)})."""
        origin, record, base_dir, _, dataset = item
        if isinstance(record, BadRecord):
            raise record
        pref = parse_preference(record, origin, base_dir)
        pref.chosen.dataset = dataset
        images, audios = self.load_media(pref.chosen, self.worker.data)
        sides = {"chosen": pref.chosen} | ({"rejected": pref.rejected} if pref.rejected else {})
        pre = {}
        for side, conv in sides.items():
            _, ids, labels = self.renderer.text_and_labels(conv)
            start, stop = answer_span(labels)
            pre[side] = (ids[:start], ids[start:stop])
        if pref.rejected:
            if pre["chosen"][0] != pre["rejected"][0]:
                raise BadRecord("prompt_mismatch", "the two sides render different prompts", origin)
            if pre["chosen"][1] == pre["rejected"][1]:
                raise BadRecord("same_answers", "the chosen and rejected answers render the same tokens",
                                origin)
        # Overflow (shrinking images, trimming audio, cutting text) must see the longer answer.
        main = max(sides, key=lambda side: len(pre[side][1]))
        return pref, sides[main], images, audios, {"main": main, **pre}

    def _assemble(self, pref: PreferenceRecord, main: Conversation, sample: dict, pre: dict) -> dict:
        start, stop = answer_span(sample["labels"])
        ids = sample["input_ids"]
        answers = {pre["main"]: ids[start:stop]}
        room = self.renderer.s.max_seq_len - start
        for side in ("chosen", "rejected"):
            if side in pre and side not in answers:
                answers[side] = pre[side][1][:room]  # cut like the longer one was (truncate_text)
        chosen = answers["chosen"]
        out = {"input_ids": ids[:start] + chosen, "labels": [IGNORE] * start + chosen,
               "mm_token_type_ids": list(sample["mm_token_type_ids"][:start]) + [0] * len(chosen)}
        for key in ("pixel_values", "image_position_ids", "input_features", "overflow", "image_budget"):
            if key in sample:
                out[key] = sample[key]
        if pref.rejected is not None:
            if answers["rejected"] == chosen:
                raise BadRecord("same_answers", "the answers are the same once cut to data.max_seq_len",
                                main.origin)
            out["rejected_ids"] = answers["rejected"]
        else:
            out["desirable"] = int(pref.desirable)
        return out


def reject(e: BadRecord, item) -> dict:
    """The reject result of `item` (the shape `data_tools.accounting.Ledger` counts)."""
    origin, record, _, _, dataset = item
    raw = record if isinstance(record, dict) else e.raw
    return {"rejected": e.reason, "detail": e.detail, "origin": e.origin or origin, "dataset": dataset,
            "record": raw}
