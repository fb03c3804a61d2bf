"""Conversation + decoded media → ONE interleaved token sequence, through the model's processor.

The processor is the source of truth for patching, audio framing and placeholder expansion;
we never re-implement those. What we add is the label mask, computed the way the model is
served (`data_tools.chat_text`: the text through the chat template, each answer, thought and
tool call labelled as the model writes it after the served prompt, checked as a token prefix).

Masks are computed on the *unexpanded* text (one `<|image|>` per image), then carried across
the processor's expansion (`<|image>` + N×`<|image|>` + `<image|>`), where every media token
is unlabelled. The walk doubles as a check that expansion changed nothing else.

Speed (benchmarks/data_throughput.py): images go through the processor with
`do_rescale=False`, so patching moves uint8 instead of float32 (4× less memory traffic) and
the uint8 cache needs no conversion; collate rescales by 1/255 exactly as the processor
would. Text-only samples skip the processor: with nothing to expand it only re-tokenizes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from data_tools.chat_text import IGNORE, ChatFormat, ChatText, Rendered
from data_tools.conversation import BadRecord, Conversation
from data_tools.steps import attach

__all__ = ["IGNORE", "ChatFormat", "RenderSettings", "Renderer"]

IMAGE_BUDGETS = (70, 140, 280, 560, 1120)
RESCALE = 1 / 255  # what the image processor multiplies uint8 pixels by; collate does the same


@dataclass
class RenderSettings:
    max_seq_len: int = 2048
    train_on: str = "assistant"
    image_tokens: int = 280
    overflow: str = "shrink"
    thinking: str = "auto"  # auto | on | off (data_tools.chat_text)


class Renderer:
    """Renders conversations for one processor, under one `RenderSettings`, in one `ChatFormat`
    (the model family's: `finetune.model.families`)."""

    def __init__(self, processor, settings: RenderSettings, chat: ChatFormat):
        self.processor = processor
        self.tok = processor.tokenizer
        self.s = settings
        self.chat = chat
        t = self.tok
        self.image_id = t.convert_tokens_to_ids(processor.image_token)
        self.audio_id = t.convert_tokens_to_ids(processor.audio_token)
        self.boi_id = t.convert_tokens_to_ids(processor.boi_token)
        self.eoi_id = t.convert_tokens_to_ids(processor.eoi_token)
        self.boa_id = t.convert_tokens_to_ids(processor.boa_token)
        self.eoa_id = t.convert_tokens_to_ids(processor.eoa_token)
        self.eot = chat.turn_end
        self.eot_id = t.convert_tokens_to_ids(self.eot)
        # Never labels, never generated: placeholders and the media boundaries.
        self.media_ids = {self.image_id, self.audio_id, self.boi_id, self.eoi_id, self.boa_id,
                          self.eoa_id}
        video = getattr(processor, "video_token", None)
        if video:
            self.media_ids.add(t.convert_tokens_to_ids(video))
        # Waveform samples per audio token: the feature extractor's framing (trimming cuts whole frames).
        self.audio_frame = getattr(getattr(processor, "feature_extractor", None), "audio_samples_per_token",
                                   None)
        ip = processor.image_processor
        # The uint8 pixel cache holds only for a processor that maps k → k/255 (Gemma 4's).
        self._uint8_pixels = not getattr(ip, "do_normalize", False) and \
            getattr(ip, "rescale_factor", RESCALE) == RESCALE
        # The wrapper around the Rust tokenizer costs ~15× the encode itself; ids are identical.
        backend = getattr(t, "backend_tokenizer", None)
        self._encode = (lambda s: backend.encode(s, add_special_tokens=False).ids) if backend else None
        self.fallbacks = 0  # batched calls redone one by one (a test keeps this at 0 on good data)
        self.chat_text = ChatText(processor, chat, train_on=settings.train_on, thinking=settings.thinking,
                                  encode=self.encode, media_ids=self.media_ids)

    # ------------------------------------------------------------------ text + labels

    def encode(self, text: str) -> list[int]:
        """`text` → token ids, no special tokens added (the tokenizer's own ids, faster)."""
        if self._encode:
            return self._encode(text)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @property
    def fast_template(self) -> bool:
        """True when the tokenizer-side template matched the processor's."""
        return self.chat_text.fast_template

    def template(self, msgs: list[dict], gen: bool, **kw) -> str:
        """The chat template applied to `msgs` (`gen`: with the generation prompt)."""
        return self.chat_text.template(msgs, gen, **kw)

    def prompt_text(self, conv: Conversation, thinking: bool = False) -> str:
        """What a server sends the model: everything before the last answer + generation prompt."""
        return self.chat_text.prompt_text(conv, thinking)

    def answer_text(self, conv: Conversation, thinking: bool = False) -> str:
        """The last answer as the model writes it, special tokens included."""
        return self.chat_text.answer_text(conv, thinking)

    def text_and_labels(self, conv: Conversation) -> tuple[str, list[int], list[int]]:
        """The training text, its unexpanded token ids, and labels (IGNORE where no loss)."""
        return self.chat_text.text_and_labels(conv)

    def rendered(self, conv: Conversation) -> Rendered:
        """`text_and_labels` plus the branches of earlier served steps (`data_tools.steps`)."""
        return self.chat_text.rendered(conv)

    # ------------------------------------------------------------------ processor

    def _process(self, texts: list[str], images: list[list], audios: list[list], budget: int) -> list[dict]:
        """One processor call for several samples → per sample: ids, types and media arrays."""
        kwargs = {}
        if any(images):
            if not self._uint8_pixels:
                raise ValueError("the uint8 pixel cache needs an image processor that rescales by "
                                 "1/255 and does not normalise (Gemma 4's does)")
            kwargs["images"] = images
            # uint8 out: the processor's own resize and patching, minus the float rescale.
            kwargs["images_kwargs"] = {"max_soft_tokens": budget, "do_rescale": False}
        if any(audios):
            kwargs["audio"] = [a for clips in audios for a in clips]  # matched in placeholder order
        try:
            # No padding: a batch of texts would otherwise come back padded to the longest.
            out = self.processor(text=texts, add_special_tokens=False, text_kwargs={"padding": False},
                                 **kwargs)
        except (ValueError, RuntimeError, TypeError) as e:
            raise BadRecord("render_failed", f"the processor refused the sample: {e}") from None
        pv = np.asarray(out["pixel_values"]) if "pixel_values" in out else None
        pos = np.asarray(out["image_position_ids"]) if pv is not None else None
        feats = np.asarray(out["input_features"]) if "input_features" in out else None
        mask = np.asarray(out["input_features_mask"], dtype=bool) if feats is not None else None
        rows, i_img, i_aud = [], 0, 0
        for k in range(len(texts)):
            row = {"ids": np.asarray(out["input_ids"][k]), "types": list(out["mm_token_type_ids"][k])}
            if images[k]:
                sl = slice(i_img, i_img + len(images[k]))
                i_img = sl.stop
                valid = (pos[sl] != -1).all(-1)  # (-1, -1) marks padding up to the budget
                row["pixel_values"] = [np.ascontiguousarray(p[v], dtype=np.uint8)
                                       for p, v in zip(pv[sl], valid)]
                row["image_position_ids"] = [q[v].astype(np.int32) for q, v in zip(pos[sl], valid)]
            if audios[k]:
                sl = slice(i_aud, i_aud + len(audios[k]))
                i_aud = sl.stop
                row["input_features"] = [f[m].astype(np.float32) for f, m in zip(feats[sl], mask[sl])]
            rows.append(row)
        return rows

    def _expand_labels(self, ids: list[int], labels: list[int], expanded: np.ndarray,
                       origin: str) -> tuple[list[int], list[int]]:
        """Labels carried onto the expanded ids, and where each unexpanded token went."""
        out, where = [], []
        u = 0
        e = 0
        n = len(expanded)
        expanded = expanded.tolist()
        opens = {self.boi_id: self.eoi_id, self.boa_id: self.eoa_id}
        placeholders = (self.image_id, self.audio_id)
        while e < n:
            tok = expanded[e]
            if tok in opens and u < len(ids) and ids[u] in placeholders:
                where.append(e)
                try:
                    end = expanded.index(opens[tok], e) + 1
                except ValueError:  # an unclosed span: the walk below then reports it
                    end = n
                out += [IGNORE] * (end - e)
                e = end
                u += 1
                continue
            if u >= len(ids) or ids[u] != tok:
                raise BadRecord("render_failed", "the processor changed text tokens while "
                                "expanding media", origin)
            out.append(labels[u])
            where.append(e)
            u += 1
            e += 1
        if u != len(ids):
            raise BadRecord("render_failed", "media expansion lost tokens", origin)
        return out, where

    def render(self, conv: Conversation, images: list, audios: list) -> dict:
        """One sample: ids, labels, mm types, media arrays, and what overflow did."""
        return self._render(conv, images, audios, self.rendered(conv), None)

    def render_many(self, items: list[tuple[Conversation, list, list]]) -> list[dict | BadRecord]:
        """`render` for several (conv, images, audios) at once; a BadRecord in place of a sample.

        Samples with the same kinds of media share one processor call: its per-call cost
        (kwargs validation, ~1 ms) is paid once. Results equal `render` item by item (tested).
        """
        out: list = [None] * len(items)
        pre, groups = {}, {}
        for k, (conv, images, audios) in enumerate(items):
            try:
                pre[k] = self.rendered(conv)
            except BadRecord as e:
                out[k] = e
                continue
            groups.setdefault((bool(images), bool(audios)), []).append(k)
        budget = self._budgets()[0]
        for (has_img, has_aud), ks in groups.items():
            first = {}
            if (has_img or has_aud) and len(ks) > 1:
                try:
                    rows = self._process([pre[k].text for k in ks], [items[k][1] for k in ks],
                                         [items[k][2] for k in ks], budget)
                except BadRecord:  # one sample spoils the call: render each alone to find which
                    self.fallbacks += 1
                    rows = []
                for k, row in zip(ks, rows):
                    with contextlib.suppress(BadRecord):  # left out: rendered alone, it says why
                        first[k] = self._sample(items[k][0], pre[k], row)
            for k in ks:
                try:
                    out[k] = self._render(*items[k], pre[k], first.get(k))
                except BadRecord as e:
                    out[k] = e
        return out

    def _budgets(self) -> list[int]:
        return [b for b in IMAGE_BUDGETS if b <= self.s.image_tokens][::-1] or [IMAGE_BUDGETS[0]]

    def _render(self, conv, images, audios, pre, first) -> dict:
        budgets = self._budgets()
        actions = []
        for budget in budgets:
            if first is not None and budget == budgets[0]:
                sample = first
            else:
                sample = self._one(conv, pre, images, audios, budget)
            if len(sample["input_ids"]) <= self.s.max_seq_len or self.s.overflow != "shrink" \
                    or not images:
                break
            if budget != budgets[-1]:
                actions = ["shrink_image"]
        if len(sample["input_ids"]) > self.s.max_seq_len:
            sample, action = self._overflow(conv, pre, images, audios, budget, sample)
            actions.append(action)
        sample["overflow"] = "+".join(actions) or "none"
        sample["image_budget"] = budget if images else 0
        if not any(x != IGNORE for x in sample["labels"]):
            raise BadRecord("no_answer", "no token carries a label", conv.origin)
        return sample

    def _overflow(self, conv, pre, images, audios, budget, sample):
        limit = self.s.max_seq_len
        n = len(sample["input_ids"])
        if self.s.overflow == "shrink" and audios:
            # Trim every clip by the same share, in whole frames (one token each). The
            # processor decides the real count, so measure again and repeat if needed.
            for _ in range(4):
                excess = len(sample["input_ids"]) - limit
                frames = [max(1, -(-len(a) // self.audio_frame)) for a in audios]
                total = sum(frames)
                if excess <= 0 or total - excess < len(audios):
                    break
                keep = [max(1, f - -(-excess * f // total)) for f in frames]
                audios = [a[: k * self.audio_frame] for a, k in zip(audios, keep)]
                sample = self._one(conv, pre, images, audios, budget)
            if len(sample["input_ids"]) <= limit:
                return sample, "trim_audio"
        if self.s.overflow == "truncate_text":
            types = sample["mm_token_type_ids"]
            last_media = max((i for i, t in enumerate(types) if t != 0), default=-1)
            # Only the tail goes, so every media span stays whole: the eoi/eoa closing the
            # last span sits right after its last placeholder and must fit too.
            if last_media + 2 <= limit and any(x != IGNORE for x in sample["labels"][:limit]):
                for key in ("input_ids", "labels", "mm_token_type_ids", "position_ids"):
                    if key in sample:
                        sample[key] = sample[key][:limit]
                return sample, "truncate_text"
        raise BadRecord("over_budget", f"{n} tokens > data.max_seq_len {limit} "
                        f"(overflow: {self.s.overflow})", conv.origin)

    def _one(self, conv, pre: Rendered, images, audios, budget) -> dict:
        if not images and not audios:
            # Nothing to expand: the processor would only tokenize `text` again into `ids`.
            sample = {"input_ids": list(pre.ids), "labels": list(pre.labels),
                      "mm_token_type_ids": [0] * len(pre.ids)}
            return attach(sample, pre.branches, range(len(pre.ids)))
        try:
            (row,) = self._process([pre.text], [images], [audios], budget)
        except BadRecord as e:
            raise BadRecord(e.reason, e.detail, conv.origin) from None
        return self._sample(conv, pre, row)

    def _sample(self, conv, pre: Rendered, row: dict) -> dict:
        labels, where = self._expand_labels(pre.ids, pre.labels, row["ids"], conv.origin)
        sample = {"input_ids": row["ids"].tolist(), "labels": labels, "mm_token_type_ids": row["types"]}
        for key in ("pixel_values", "image_position_ids", "input_features"):
            if key in row:
                sample[key] = row[key]
        return attach(sample, pre.branches, where)
