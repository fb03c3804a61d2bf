"""`finetune VERB ...`: each verb maps to one function.

Bad input exits 2 with `error: <where>: <what>. <fix>` on stderr and no traceback (unless
--debug); anything else is a bug and exits 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path

from finetune.errors import TrainingStopped, UserError

# ---------------------------------------------------------------- verbs


def cmd_train(args) -> int:
    from finetune.config.recipe import load_recipe
    from finetune.plan.checks import preflight, refuse_overwrite
    from finetune.training.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    preflight(recipe)
    removed = refuse_overwrite(recipe, resume=args.resume, overwrite=args.overwrite)
    if removed:
        print(f"--overwrite: removing the previous run in {recipe.train.output_dir}: {', '.join(removed)}")
    try:
        result = train(recipe, resume=args.resume, force=args.force, log=print)
    except TrainingStopped as e:
        overrides = " ".join(args.overrides)
        print(f"stopped at step {e.step}: checkpoint {e.checkpoint}\nresume with: finetune train "
              f"{args.recipe}{' ' + overrides if overrides else ''} --resume", file=sys.stderr)
        return 130
    print(f"adapter: {result.adapter_dir}  ({result.steps} steps, {result.seconds:.0f}s, "
          f"{result.tokens_per_s:.0f} real tokens/s)")
    return 0


def cmd_validate(args) -> int:
    from finetune.config.recipe import load_recipe
    from finetune.plan.checks import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    preflight(recipe, data=not args.no_data, model=not args.no_data)
    print(f"ok: {args.recipe}")
    return 0


def cmd_align_drafter(args) -> int:
    from finetune.config.recipe import load_recipe
    from finetune.drafter.alignment import align_drafter
    from finetune.plan.checks import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    preflight(recipe)
    out = args.out or str(Path(recipe.train.output_dir) / "drafter")
    report = align_drafter(recipe, args.adapter, out, resume=args.resume, log=print)
    print(f"drafter: {out}  ({report['steps']} steps, {report['seconds']:.0f}s, draft acceptance "
          f"{report['final'].get('drafter/acceptance', 0):.3f} on the last step)")
    print(f"measure it: finetune eval {args.recipe} --adapter {args.adapter or 'ADAPTER'} --drafter {out}")
    return 0


def cmd_tiny_model(args) -> int:
    from finetune.demo.tiny_model import write_tiny_model

    out = write_tiny_model(args.dir, seed=args.seed, num_kv_shared_layers=args.kv_shared,
                           num_layers=args.layers, tokenizer=args.tokenizer)
    print(f"tiny gemma4_unified base written to {out} (its MTP drafter: {out / 'drafter'})")
    return 0


def cmd_demo(args) -> int:
    from finetune.workflows.demo import run_demo, run_preference_demo

    if args.grpo:
        from finetune.workflows.grpo import run_grpo_demo

        run_grpo_demo(args.overrides, log=print)
        return 0
    (run_preference_demo if args.preference else run_demo)(args.overrides, log=print)
    return 0


def cmd_data_stats(args) -> int:
    from finetune.workflows.data import data_stats

    stats = data_stats(args.recipe, args.overrides)
    if args.json:
        print(json.dumps(stats))
    else:
        from finetune.workflows.data import format_stats

        print(format_stats(stats))
    from data_tools.accounting import check_yield

    check_yield(stats, stats["max_rejected_fraction"], stats["rejects_file"])  # the run's own rule
    return 0


def cmd_data_clear_cache(args) -> int:
    from finetune.workflows.data import clear_cache

    folder = clear_cache(args.recipe, args.overrides)
    print(f"removed {folder}" if folder else "nothing cached for this recipe")
    return 0


def cmd_data_preview(args) -> int:
    from data_tools.preview import write_preview
    from finetune.config.recipe import load_recipe
    from finetune.model.load import base_family, load_processor

    recipe = load_recipe(args.recipe, args.overrides)
    processor = load_processor(recipe.model.base, recipe.data.image_tokens, recipe.model.trust_remote_code)
    out_dir = Path(recipe.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_preview(recipe, processor, args.out, recipe_path=args.recipe,
                         processor_dir=recipe.model.base, rejects_path=out_dir / "rejects.jsonl",
                         chat=base_family(recipe.model.base, recipe.model.trust_remote_code).chat, n=args.n,
                         jsonl=args.jsonl)
    print(f"preview written to {path}" + (f" and {args.jsonl}" if args.jsonl else ""))
    return 0


class _InOrder(argparse._AppendAction):
    """`append`, and also records which flag came when (`media_order`): with no `{image}` /
    `{audio}` markers, `--audio a.wav --image b.png` puts the clip before the picture."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.media_order = [*getattr(namespace, "media_order", []), self.dest]


def _lazy(module: str, name: str):
    def run(args):
        import importlib

        return importlib.import_module(module).__dict__[name](args)

    return run


# ---------------------------------------------------------------- parser


OVERRIDES = "key.path=value overrides (paths typed here resolve against the current folder)"
COMBINE_HELP = """combine adapters of one base into one, with PEFT's add_weighted_adapter

The spec is YAML (relative paths resolve against the spec's folder):

  method: cat            # cat | svd | linear | ties | ties_svd | dare_linear | dare_ties | magnitude_prune
  adapters:
    - {path: runs/a/adapter, weight: 0.5}
    - {path: runs/b/adapter, weight: 0.5}
  output: runs/ab         # a new folder
  density: 0.5            # ties / dare / magnitude_prune: share of values kept
  svd_rank: 16            # svd / ties_svd: rank of the result (default: the largest input rank)
  base: google/gemma-4-12B-it   # only when the adapters' base_model_name_or_path is stale

cat and svd blend the updates B·A themselves (cat exactly, at the sum of the ranks); linear,
ties, dare_* and magnitude_prune weight A and B apart and need equal ranks."""


def build_parser() -> argparse.ArgumentParser:
    from finetune.export import FORMATS

    p = argparse.ArgumentParser(prog="finetune", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True)

    def recipe_verb(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("recipe", help="the recipe YAML (paths in it resolve against its folder)")
        sp.add_argument("overrides", nargs="*", help=OVERRIDES)
        sp.set_defaults(func=func)
        return sp

    sp = recipe_verb("train", cmd_train, "train an adapter")
    sp.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace the run already in train.output_dir: everything in that folder is removed "
                         "(but a data cache inside it)")
    sp.add_argument("--force", action="store_true",
                    help="--resume even when the base or the data changed since the run began (provenance.json)")
    sp = recipe_verb("align-drafter", cmd_align_drafter, "align the MTP drafter (drafter.path) to base + adapter")
    sp.add_argument("--adapter", help="the adapter to align to (default: the base itself)")
    sp.add_argument("--out", help="drafter folder and run (default: <train.output_dir>/drafter)")
    sp.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    sp = recipe_verb("validate", cmd_validate, "check a recipe (and its data sources)")
    sp.add_argument("--no-data", action="store_true", help="skip checking data sources and the base")

    sp = sub.add_parser("tiny-model", help="write the tiny gemma4_unified test base")
    sp.add_argument("dir", help="folder to write the base into (a drafter goes to DIR/drafter)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    sp.add_argument("--kv-shared", type=int, default=0, help="num_kv_shared_layers")
    sp.add_argument("--layers", type=int, default=4, choices=[2, 4, 6, 8],
                    help="decoder layers, alternating sliding/full")
    sp.add_argument("--tokenizer", default=None, metavar="PATH",
                    help="a real Gemma 4 tokenizer instead of the tiny one: a tokenizer folder or a llama.cpp "
                         "vocab GGUF (models/ggml-vocab-gemma-4.gguf); the vocabulary becomes its size")
    sp.set_defaults(func=cmd_tiny_model)

    sp = sub.add_parser("demo", help="the bundled end-to-end demo (same as python train.py)")
    sp.add_argument("overrides", nargs="*", help=OVERRIDES + " of recipes/demo.yaml")
    kind = sp.add_mutually_exclusive_group()
    kind.add_argument("--preference", action="store_true", help="the DPO demo (recipes/preference-demo.yaml)")
    kind.add_argument("--grpo", action="store_true", help="the GRPO demo: online RL after a brief SFT "
                      "(recipes/grpo-demo.yaml)")
    sp.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="inspect the data a recipe makes").add_subparsers(
        dest="data_verb", required=True)
    sp = data.add_parser("stats", help="what every record became (exit 2 when a dataset yields nothing)")
    sp.add_argument("recipe", help="the recipe YAML")
    sp.add_argument("overrides", nargs="*", help=OVERRIDES)
    sp.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    sp.set_defaults(func=cmd_data_stats)
    sp = data.add_parser("clear-cache", help="remove this recipe's tokenized-data cache (data.cache_dir)")
    sp.add_argument("recipe", help="the recipe YAML")
    sp.add_argument("overrides", nargs="*", help=OVERRIDES)
    sp.set_defaults(func=cmd_data_clear_cache)
    sp = data.add_parser("preview", help="a self-contained HTML page of rendered samples")
    sp.add_argument("recipe", help="the recipe YAML")
    sp.add_argument("overrides", nargs="*", help=OVERRIDES)
    sp.add_argument("--out", required=True, help="the HTML file to write")
    sp.add_argument("--n", type=int, default=20, help="how many records to show (default 20)")
    sp.add_argument("--jsonl", help="also write the samples as JSON lines: {id, text, labels}")
    sp.set_defaults(func=cmd_data_preview)

    sp = recipe_verb("plan", _lazy("finetune.cli.plan", "cmd_plan"), "predict peak GPU memory, offline")
    sp.add_argument("--json", action="store_true", help="the plan as JSON (peak_gib, fits, breakdown, suggestions)")
    sp.add_argument("--budget-gib", type=float, default=16.0, help="GPU memory to fit in (default 16)")
    sp.add_argument("--check", action="store_true", help="exit 3 when the recipe does not fit the budget")
    sp.add_argument("--gpus", type=int, default=1, help="GPUs (processes) the run is launched on (default 1)")
    sp.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                    help="with --gpus > 1: ddp (a whole model per GPU) or fsdp (FSDP2: sharded); default ddp")

    sp = sub.add_parser("merge", help="merge an adapter into a full-precision base")
    sp.add_argument("adapter", help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    sp.add_argument("out", help="a new folder for the merged model")
    sp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the saved weights")
    sp.add_argument("--base", help="the full-precision base (default: the adapter's base_model_name_or_path)")
    sp.add_argument("--force", action="store_true",
                    help="go on when the adapter's provenance.json names another base (or the run's, other data)")
    sp.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (pickle can run code)")
    sp.add_argument("--low-memory", action="store_true", default=None,
                    help="merge tensor by tensor from the safetensors files (a few GiB of RAM for a 12B); "
                         "chosen by itself when the fp32 model would not fit")
    sp.set_defaults(func=_lazy("finetune.cli.export", "cmd_merge"))

    sp = sub.add_parser("combine", help="combine adapters (linear/cat/svd/ties/dare…)",
                        description=COMBINE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("spec", help="the combine spec YAML (see above)")
    sp.set_defaults(func=_lazy("finetune.cli.export", "cmd_combine"))

    sp = sub.add_parser("export", help="export an adapter for a server")
    sp.add_argument("--format", required=True, choices=FORMATS,
                    help="drafter: ADAPTER is a folder from `finetune align-drafter`")
    sp.add_argument("adapter", help="the adapter folder (or, for --format drafter, the aligned drafter)")
    sp.add_argument("out", help="a new folder for the export")
    sp.add_argument("--merge-projections", action="store_true",
                    help="vllm/sglang: a full merged copy of the base instead of the linked model folder")
    sp.add_argument("--link", choices=["hard", "symlink"],
                    help="vllm/sglang: how the linked model folder points at the base's weight files (default hard)")
    sp.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                    help="gguf/ollama: tensor type of the GGUF files (default f16)")
    sp.add_argument("--base-gguf", help="gguf/ollama: the base model as GGUF, for the serve command / FROM")
    sp.add_argument("--base", help="the base model (default: the adapter's base_model_name_or_path)")
    sp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                    help="--format merged: dtype of the saved weights")
    sp.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (pickle can run code)")
    sp.add_argument("--low-memory", action="store_true", default=None, help="--format merged: as in merge")
    sp.add_argument("--force", action="store_true",
                    help="go on when the adapter's provenance.json names another base (or the run's, other data)")
    sp.set_defaults(func=_lazy("finetune.cli.export", "cmd_export"))

    sp = recipe_verb("eval", _lazy("finetune.cli.eval", "cmd_eval"), "base vs adapter, item by item")
    sp.add_argument("--adapter", required=True, help="the adapter folder to judge against its base")
    sp.add_argument("--force", action="store_true",
                    help="go on when the adapter's provenance.json names another base (or the run's, other data)")
    sp.add_argument("--out", help="folder for eval.json and report.html (default: <adapter's run>/eval)")
    sp.add_argument("--json", action="store_true", help="print eval.json instead of the table")
    sp.add_argument("--max-items", type=int, help="judge at most this many held-out items")
    sp.add_argument("--drafter", help="an aligned MTP drafter: acceptance next to drafter.path's")

    sp = sub.add_parser("generate", help="answer one prompt (streamed)")
    sp.add_argument("prompt", help="the user's message; {image} / {audio} mark where each file goes")
    sp.add_argument("--adapter", help="an adapter folder (its base is loaded as it was trained: NF4 for QLoRA)")
    sp.add_argument("--base", help="a model folder or hub id (a merged model, or the base without adapter)")
    sp.add_argument("--image", action=_InOrder, default=[], help="an image file (repeatable)")
    sp.add_argument("--audio", action=_InOrder, default=[], help="an audio file (repeatable)")
    sp.add_argument("--max-new-tokens", type=int, default=64,
                    help="longest answer (default 64; generation stops earlier at the end of the turn)")
    sp.add_argument("--thinking", action="store_true", help="serve with thinking on (the thought goes to stderr)")
    sp.set_defaults(func=_lazy("finetune.cli.eval", "cmd_generate"), media_order=[])

    sp = sub.add_parser("chat", help="interactive chat with /image, /audio, /reset")
    sp.add_argument("--adapter", help="an adapter folder (its base is loaded as it was trained)")
    sp.add_argument("--base", help="a model folder or hub id (a merged model, or the base without adapter)")
    sp.add_argument("--max-new-tokens", type=int, default=128,
                    help="longest answer (default 128; each stops earlier at the end of the turn)")
    sp.add_argument("--thinking", action="store_true", help="serve with thinking on (thoughts go to stderr)")
    sp.set_defaults(func=_lazy("finetune.cli.eval", "cmd_chat"))
    return p


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`--debug` works anywhere on the line, not only before the verb."""
    if "--" in argv:
        cut = argv.index("--")
        head, tail = argv[:cut], argv[cut:]
    else:
        head, tail = argv, []
    return [a for a in head if a != "--debug"] + tail, "--debug" in head


def _environment_error(e: BaseException) -> UserError | None:
    """Failures the user fixes outside finetune (a path, permissions, disk, memory): exit 2, not a bug."""
    if isinstance(e, OSError) and (e.filename is not None or e.errno in (errno.ENOSPC, errno.EDQUOT)):
        where = str(e.filename) if e.filename is not None else "disk"
        fix = ("Free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT)
               else "Check the path and its permissions")
        return UserError(where, e.strerror or type(e).__name__, fix)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return UserError("memory", f"out of GPU memory ({str(e).splitlines()[0][:160]})",
                         "Lower train.batch_size or data.max_seq_len, or run `finetune plan` first")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, debug = _split_debug(argv)
    parser = build_parser()
    # Overrides may also follow flags (`plan R --json lora.r=8`): argparse stops collecting the
    # positional list at the first flag, so pick the stragglers up here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.debug = args.debug or debug
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from finetune.model.load import quiet_loading

        # transformers' own bars, info lines and deprecation warnings say nothing a user acts on
        with quiet_loading():
            return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `finetune data stats --json | head`: the reader left, nothing to report
        try:  # keep Python's exit-time flush of stdout from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # what a shell reports for a writer killed by SIGPIPE
    except Exception as e:
        if args.debug:
            raise
        user = e if isinstance(e, UserError) else _environment_error(e)
        if user is not None:
            for line in user.lines():
                print(f"error: {line}", file=sys.stderr)
            return 2
        # A bug in finetune: the traceback is what a bug report needs.
        traceback.print_exc()
        print(f"internal error: {type(e).__name__}: {e}. This is a bug in finetune; please report it "
              "with the traceback above.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
