"""Conversation + decoded media → ONE interleaved token sequence, through the model's processor.

The processor is the source of truth for patching, audio framing and placeholder expansion;
we never re-implement those. What we add is the label mask, computed the way the model is
served: each assistant answer is the continuation of the prompt rendered with
`add_generation_prompt=True` (for Gemma 4 that prompt ends with the empty thinking scaffold),
and we check that this prompt is an exact token prefix of the sequence we train on.

Masks are computed on the *unexpanded* text (one `<|image|>` per image), then carried across
the processor's expansion (`<|image>` + N×`<|image|>` + `<image|>`), where every media token
is unlabelled. The walk doubles as a check that expansion changed nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_tools.conversation import BadRecord, Conversation

IGNORE = -100
IMAGE_BUDGETS = (70, 140, 280, 560, 1120)


@dataclass
class RenderSettings:
    max_seq_len: int = 2048
    train_on: str = "assistant"
    image_tokens: int = 280
    overflow: str = "shrink"


def hf_messages(conv: Conversation) -> list[dict]:
    """Our parts → the content-part dicts chat templates read (media objects passed apart)."""
    out = []
    for m in conv.messages:
        parts = []
        for p in m.parts:
            if p.type == "text":
                parts.append({"type": "text", "text": p.text or ""})
            else:
                parts.append({"type": p.type})
        out.append({"role": m.role, "content": parts})
    return out


class Renderer:
    def __init__(self, processor, settings: RenderSettings):
        self.processor = processor
        self.tok = processor.tokenizer
        self.s = settings
        t = self.tok
        self.image_id = t.convert_tokens_to_ids(processor.image_token)
        self.audio_id = t.convert_tokens_to_ids(processor.audio_token)
        self.boi_id = t.convert_tokens_to_ids(processor.boi_token)
        self.eoi_id = t.convert_tokens_to_ids(processor.eoi_token)
        self.boa_id = t.convert_tokens_to_ids(processor.boa_token)
        self.eoa_id = t.convert_tokens_to_ids(processor.eoa_token)
        self.eot = "<turn|>"
        self.eot_id = t.convert_tokens_to_ids(self.eot)
        # Never labels, never generated: placeholders and the media boundaries.
        self.media_ids = {self.image_id, self.audio_id, self.boi_id, self.eoi_id, self.boa_id,
                          self.eoa_id, t.convert_tokens_to_ids("<|video|>")}

    # ------------------------------------------------------------------ text + labels

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _template(self, msgs: list[dict], gen: bool) -> str:
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def prompt_text(self, conv: Conversation) -> str:
        """What a server sends the model: everything before the last answer + generation prompt."""
        msgs = hf_messages(conv)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return self._template(msgs, gen=True)

    def text_and_labels(self, conv: Conversation) -> tuple[str, list[int], list[int]]:
        """The training text, its unexpanded token ids, and labels (IGNORE where no loss)."""
        if conv.kind == "text":
            text = self.tok.bos_token + conv.messages[0].text() + self.tok.eos_token
            ids = self._ids(text)
            return text, ids, [IGNORE] + ids[1:]

        msgs = hf_messages(conv)
        last = len(msgs) - 1
        if msgs[last]["role"] != "assistant":
            raise BadRecord("no_answer", "the conversation does not end with an assistant answer",
                            conv.origin)
        answer = conv.messages[last].text().strip()
        if not answer:
            raise BadRecord("no_answer", "the assistant answer is empty", conv.origin)
        prompt = self._template(msgs[:last], gen=True)
        text = prompt + answer + self.eot + "\n"
        ids = self._ids(text)
        prompt_ids = self._ids(prompt)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise BadRecord("render_failed", "the generation prompt is not a token prefix of the "
                            "rendered sample (the answer merges with the prompt's last token)",
                            conv.origin)
        labels = [IGNORE] * len(ids)
        if self.s.train_on == "all":
            labels = [i if i not in self.media_ids else IGNORE for i in ids]
            labels[0] = IGNORE
            return text, ids, labels

        spans = [(len(prompt_ids), len(ids))]
        if self.s.train_on == "assistant":
            spans += self._history_spans(msgs, last, ids, conv.origin)
        for start, end in spans:
            # Label the answer through its end-of-turn token, not the newline after it:
            # generation stops at <turn|>, so that is the last thing the model must emit.
            stop = max((k for k in range(start, end) if ids[k] == self.eot_id), default=end - 1)
            for k in range(start, stop + 1):
                labels[k] = ids[k]
        return text, ids, labels

    def _history_spans(self, msgs, last, ids, origin) -> list[tuple[int, int]]:
        """Spans of earlier assistant answers, as they appear in the served history."""
        spans = []
        for i in range(last):
            if msgs[i]["role"] != "assistant":
                continue
            before = self._template(msgs[:i], gen=False)
            header = self._ids(before + "<|turn>model\n")
            through = self._ids(self._template(msgs[: i + 1], gen=False))
            if ids[: len(header)] != header or ids[: len(through)] != through:
                raise BadRecord("render_failed", f"turn {i} does not render as a prefix", origin)
            spans.append((len(header), len(through)))
        return spans

    # ------------------------------------------------------------------ processor

    def _process(self, text: str, images: list, audios: list, budget: int) -> dict:
        kwargs = {}
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = {"max_soft_tokens": budget}
        if audios:
            kwargs["audio"] = audios
        try:
            out = self.processor(text=text, add_special_tokens=False, return_tensors="np", **kwargs)
        except (ValueError, RuntimeError, TypeError) as e:
            raise BadRecord("render_failed", f"the processor refused the sample: {e}") from None
        return out

    def _expand_labels(self, ids: list[int], labels: list[int], expanded: np.ndarray,
                       origin: str) -> list[int]:
        out = []
        u = 0
        e = 0
        n = len(expanded)
        while e < n:
            tok = int(expanded[e])
            if tok in (self.boi_id, self.boa_id) and u < len(ids) and ids[u] in (self.image_id,
                                                                                 self.audio_id):
                end_id = self.eoi_id if tok == self.boi_id else self.eoa_id
                while e < n and int(expanded[e]) != end_id:
                    out.append(IGNORE)
                    e += 1
                out.append(IGNORE)
                e += 1
                u += 1
                continue
            if u >= len(ids) or ids[u] != tok:
                raise BadRecord("render_failed", "the processor changed text tokens while "
                                "expanding media", origin)
            out.append(labels[u])
            u += 1
            e += 1
        if u != len(ids):
            raise BadRecord("render_failed", "media expansion lost tokens", origin)
        return out

    def render(self, conv: Conversation, images: list, audios: list) -> dict:
        """One sample: ids, labels, mm types, media tensors, and what overflow did."""
        text, ids, labels = self.text_and_labels(conv)
        budgets = [b for b in IMAGE_BUDGETS if b <= self.s.image_tokens][::-1] or [IMAGE_BUDGETS[0]]
        action = "none"
        for budget in budgets:
            sample = self._one(conv, text, ids, labels, images, audios, budget)
            if len(sample["input_ids"]) <= self.s.max_seq_len or self.s.overflow != "shrink" \
                    or not images:
                break
            action = "shrink_image"
        if len(sample["input_ids"]) > self.s.max_seq_len:
            sample, action = self._overflow(conv, text, ids, labels, images, audios, budget, sample,
                                            action)
        sample["overflow"] = action
        sample["image_budget"] = budget if images else 0
        if not any(x != IGNORE for x in sample["labels"]):
            raise BadRecord("no_answer", "no token carries a label", conv.origin)
        return sample

    def _overflow(self, conv, text, ids, labels, images, audios, budget, sample, action):
        limit = self.s.max_seq_len
        n = len(sample["input_ids"])
        if self.s.overflow == "shrink" and audios:
            # Trim every clip by the same share, in whole 640-sample frames (one token each).
            excess = n - limit
            frames = [max(1, -(-len(a) // 640)) for a in audios]
            total = sum(frames)
            if total - excess >= len(audios):
                keep = [max(1, f - -(-excess * f // total)) for f in frames]
                trimmed = [a[: k * 640] for a, k in zip(audios, keep)]
                sample = self._one(conv, text, ids, labels, images, trimmed, budget)
                action = "trim_audio"
                if len(sample["input_ids"]) <= limit:
                    return sample, action
        if self.s.overflow == "truncate_text":
            types = sample["mm_token_type_ids"]
            last_media = max((i for i, t in enumerate(types) if t != 0), default=-1)
            # The eoi/eoa closing the last span sits right after it: keep that too.
            if last_media + 2 <= limit and any(x != IGNORE for x in sample["labels"][:limit]):
                for key in ("input_ids", "labels", "mm_token_type_ids"):
                    sample[key] = sample[key][:limit]
                return sample, "truncate_text"
        raise BadRecord("over_budget", f"{n} tokens > data.max_seq_len {limit} "
                        f"(overflow: {self.s.overflow})", conv.origin)

    def _one(self, conv, text, ids, labels, images, audios, budget) -> dict:
        out = self._process(text, images, audios, budget)
        expanded = out["input_ids"][0]
        sample = {
            "input_ids": expanded.tolist(),
            "labels": self._expand_labels(ids, labels, expanded, conv.origin),
            "mm_token_type_ids": out["mm_token_type_ids"][0].tolist(),
        }
        if images:
            pv = out["pixel_values"]  # (n_images, budget, 6912), values exactly k/255
            pos = out["image_position_ids"]  # (n_images, budget, 2), (-1, -1) = padding
            valid = (pos != -1).all(-1)
            # Cache as uint8 (4x smaller than fp32); collate rebuilds k * (1/255) bit-exactly.
            sample["pixel_values"] = [np.rint(pv[i][valid[i]] * 255).astype(np.uint8)
                                      for i in range(len(pv))]
            sample["image_position_ids"] = [pos[i][valid[i]].astype(np.int32) for i in range(len(pv))]
        if audios:
            feats, mask = out["input_features"], out["input_features_mask"]
            sample["input_features"] = [feats[i][mask[i]].astype(np.float32) for i in range(len(feats))]
        return sample
