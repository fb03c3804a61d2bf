"""`finetune eval | generate | chat`: the adapter judged item by item, and talked to.

The work is the library's (`finetune.eval.evaluate.evaluate_adapter`, `finetune.model.generate`); this
module parses options, prints, and writes `eval.json` and `report.html`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from data_tools.conversation import BadRecord, Conversation, Message, Part
from finetune.errors import UserError


def cmd_eval(args) -> int:
    from finetune.config.recipe import load_recipe
    from finetune.eval.evaluate import evaluate_adapter
    from finetune.eval.report import write_report
    from finetune.model.provenance import check_base

    recipe = load_recipe(args.recipe, args.overrides)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    check_base(args.adapter, recipe.model.base, force=getattr(args, "force", False), log=log)
    result, items = evaluate_adapter(recipe, args.adapter, max_items=args.max_items, log=log, progress=True,
                                     drafter=getattr(args, "drafter", None))
    out = Path(args.out) if args.out else default_eval_dir(args.adapter)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    write_report(out / "report.html", result, items, f"{args.adapter} vs {recipe.model.base}")
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(_summary_table(result))
        if "preference" in result:
            from finetune.eval.preference import format_table

            print(format_table(result["preference"]))
        if "rewards" in result:
            print("mean reward of the greedy answers (the recipe's grpo.rewards):\n" + _reward_table(result["rewards"]))
        if "agent" in result:
            a = result["agent"]
            print(f"agent loop on {a['base']['n']} tool-use item(s): call accuracy base {a['base']['call_accuracy']} "
                  f"→ adapter {a['adapter']['call_accuracy']}; final answer exact base {a['base']['final_exact']} "
                  f"→ adapter {a['adapter']['final_exact']}")
        if "drafter" in result:
            from finetune.drafter.alignment import format_pairings

            print("drafter acceptance:\n" + format_pairings(result["drafter"]))
        print(f"wrote {out / 'eval.json'} and {out / 'report.html'}")
    return 0


def default_eval_dir(adapter: str | Path) -> Path:
    """Each adapter's own eval folder: `<run>/eval` for `<run>/adapter` (a checkpoint's adapter
    included), `<adapter>-eval` for an adapter folder of another name."""
    adapter = Path(adapter)
    return adapter.parent / "eval" if adapter.name == "adapter" else adapter.with_name(adapter.name + "-eval")


def _summary_table(result: dict) -> str:
    lines = [f"{'':<12}{'n':>5}{'wins':>6}{'losses':>8}{'ties':>6}  metric        base  adapter"]
    for name, g in [("all", result["summary"]), *result["by_modality"].items()]:
        for metric, m in g["metrics"].items():
            lines.append(f"{name:<12}{g['n']:>5}{g['wins']:>6}{g['losses']:>8}{g['ties']:>6}  "
                         f"{metric:<12}{m['base']:>6.3f}{m['adapter']:>9.3f}")
    return "\n".join(lines)


def _reward_table(rewards: dict) -> str:
    lines = [f"{'modality':<12}{'n':>5}{'base':>10}{'adapter':>10}"]
    for m, a in rewards["adapter"].items():
        lines.append(f"{m:<12}{a['n']:>5}{rewards['base'][m]['reward']:>10.3f}{a['reward']:>10.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- generate / chat


def media_for_prompt(kind: str, path: str):
    """One file from the command line, decoded by the data pipeline's loader under a recipe's
    default caps (data: section)."""
    from data_tools.media import load_media
    from finetune.config.recipe import DataSection

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--{kind} {path}", "file not found" if not p.exists() else "not a file",
                        "Check the path")
    conv = Conversation([Message("user", [Part(kind, ref=str(p.resolve()), ref_kind="path")])])
    try:
        images, audios = load_media(conv, DataSection())
        return (images or audios)[0]
    except BadRecord as e:
        raise UserError(f"--{kind} {path}", e.detail, f"Pass a readable {kind} file") from None


_MARKER = re.compile(r"\{(image|audio)\}")


def user_parts(prompt: str, n_images: int, n_audios: int, order: list[str] | None = None) -> list[Part]:
    """Media go where `{image}`/`{audio}` markers put them, else before the prompt in `order`
    (the kinds in command-line order; default: images, then audio)."""
    counts = {"image": n_images, "audio": n_audios}
    marked = {k: prompt.count("{" + k + "}") for k in counts}
    for k, n in marked.items():
        if n and n != counts[k]:
            raise UserError("prompt", f"{n} {{{k}}} marker(s) but {counts[k]} --{k} file(s)",
                            f"Give one --{k} per {{{k}}} marker, or drop the markers")
    order = order or ["image"] * n_images + ["audio"] * n_audios
    parts = [Part(k) for k in order if not marked[k]]
    for i, piece in enumerate(_MARKER.split(prompt)):
        if i % 2:
            parts.append(Part(piece))
        elif piece.strip():
            parts.append(Part("text", text=piece))
    return parts


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from finetune.model.generate import generate, load_for_inference

    images = [media_for_prompt("image", p) for p in args.image]  # bad paths fail before the model loads
    audios = [media_for_prompt("audio", p) for p in args.audio]
    conv = Conversation([Message("user", user_parts(args.prompt, len(images), len(audios),
                                                    getattr(args, "media_order", None)))])
    model, processor, chat, image_tokens = load_for_inference(args.adapter, args.base)
    if getattr(args, "thinking", False):  # the thought first, apart from the answer: no streaming
        raw = generate(model, processor, chat, conv, images, audios, max_new_tokens=args.max_new_tokens,
                       image_tokens=image_tokens, thinking=True, raw=True)
        print(_answer(raw, processor, chat))
        return 0
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate(model, processor, chat, conv, images, audios, max_new_tokens=args.max_new_tokens,
             image_tokens=image_tokens, streamer=streamer)
    return 0


def _answer(raw: str, processor, chat) -> str:
    """A raw answer's thought to stderr ("[thought] ..."), the answer (special tokens dropped) back."""
    from data_tools.chat_text import split_thought

    thought, answer = split_thought(raw, chat)
    if thought:
        print(f"[thought] {thought}", file=sys.stderr)
    tok = processor.tokenizer
    return tok.decode(tok.encode(answer, add_special_tokens=False), skip_special_tokens=True).strip()


CHAT_HELP = "commands: /image PATH, /audio PATH (attach to your next message), /reset, /quit"


def cmd_chat(args) -> int:
    from finetune.model.generate import generate, load_for_inference

    model, processor, chat, image_tokens = load_for_inference(args.adapter, args.base)
    interactive = sys.stdin.isatty()
    history: list[Message] = []
    images, audios, pending = [], [], []  # media of the whole history, in prompt order
    print(CHAT_HELP)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        line = line.strip()
        if not line:
            continue
        cmd, _, rest = line.partition(" ")
        if cmd in ("/image", "/audio"):
            kind = cmd[1:]
            try:
                media = media_for_prompt(kind, rest.strip())
            except UserError as e:  # a typo must not end the conversation
                print(f"error: {e.line()}", file=sys.stderr)
                continue
            pending.append((kind, media))
            print(f"[{kind} attached: {rest.strip()}]")
            continue
        if cmd == "/reset":
            history, images, audios, pending = [], [], [], []
            print("[history cleared]")
            continue
        if cmd.startswith("/"):
            print(CHAT_HELP)
            continue
        parts = [Part(kind) for kind, _ in pending] + [Part("text", text=line)]
        images += [m for k, m in pending if k == "image"]
        audios += [m for k, m in pending if k == "audio"]
        pending = []
        history.append(Message("user", parts))
        thinking = getattr(args, "thinking", False)
        answer = generate(model, processor, chat, Conversation(list(history)), images, audios,
                          max_new_tokens=args.max_new_tokens, image_tokens=image_tokens, thinking=thinking,
                          raw=thinking)
        if thinking:
            answer = _answer(answer, processor, chat)
        history.append(Message("assistant", [Part("text", text=answer)]))
        print(answer, flush=True)
