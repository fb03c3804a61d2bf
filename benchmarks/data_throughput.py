"""Preprocessing throughput: the demo mix rendered with num_proc 1 and 2, and a cached reload.

    python benchmarks/data_throughput.py [--n-image 160 --n-audio 160 ...]

Builds the tiny base and the demo data in a temp folder, renders every record through the
real processor (no cache), then builds the Arrow cache and times a second `prepare()` that
reuses it. Writes `benchmarks/results/data_throughput.json`. Targets (issue 4): >= 200
samples/s on a 2-core machine, cached reload < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_SAMPLES_S = 200.0
TARGET_RELOAD_S = 1.0


def _recipe(tmp: Path, num_proc: int):
    """The shipped demo recipe, its runs/demo/ paths moved into `tmp`."""
    from finetune.config.recipe import load_recipe, read_yaml

    demo = ROOT / "recipes" / "demo.yaml"
    raw = read_yaml(demo)
    moved = [f"{key}.{i}.path={tmp / 'data' / Path(d['path']).name}"
             for key in ("datasets", "eval_datasets") for i, d in enumerate(raw.get(key, []))]
    return load_recipe(demo, moved + [
        f"model.base={tmp / 'base'}", f"data.cache_dir={tmp / 'cache'}",
        f"train.output_dir={tmp / 'out'}", f"data.num_proc={num_proc}"])


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(n_image: int, n_audio: int, n_mixed: int, repeats: int) -> dict:
    from data_tools.pipeline import prepare
    from finetune.demo.data import make_demo_data
    from finetune.demo.tiny_model import write_tiny_model
    from finetune.model.load import base_family, load_processor

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_tiny_model(tmp / "base")
        make_demo_data(tmp / "data", n_image=n_image, n_audio=n_audio, n_mixed=n_mixed)
        processor = load_processor(str(tmp / "base"), 70)
        (tmp / "out").mkdir()
        data_kw = {"rejects_path": tmp / "out" / "rejects.jsonl", "chat": base_family(str(tmp / "base")).chat}
        result = {"cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "num_proc": {},
                  "note": "wall figures depend on what else the machine runs (load_avg_1m); "
                          "samples_per_cpu_s is what one idle core would do"}
        for num_proc in (1, 2):
            recipe = _recipe(tmp, num_proc)
            best, best_cpu = None, None
            for _ in range(repeats):  # best of: the machine is shared, the minimum is the signal
                c0, t0 = _cpu(), time.perf_counter()
                prep = prepare(recipe, processor, str(tmp / "base"), log=None, use_cache=False, **data_kw)
                dt, cpu = time.perf_counter() - t0, _cpu() - c0
                best = dt if best is None else min(best, dt)
                best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
            records = prep.stats["total"]["records"] + (prep.stats["eval"] or {}).get("records", 0)
            result["num_proc"][str(num_proc)] = {
                "records": records, "seconds": round(best, 3), "samples_per_s": round(records / best, 1),
                # CPU seconds of this process and its (reaped) workers: what the work costs on
                # an idle machine, whatever else the shared machine was running.
                "cpu_seconds": round(best_cpu, 3), "samples_per_cpu_s": round(records / best_cpu, 1)}
        recipe = _recipe(tmp, 2)
        prepare(recipe, processor, str(tmp / "base"), log=None, **data_kw)  # builds the cache
        t0 = time.perf_counter()
        prep = prepare(recipe, processor, str(tmp / "base"), log=None, **data_kw)
        assert prep.from_cache
        result["cached_reload_s"] = round(time.perf_counter() - t0, 3)
        result["modalities"] = prep.stats["total"]["by_modality"]
    best_rate = max(v["samples_per_s"] for v in result["num_proc"].values())
    result["targets"] = {"samples_per_s": TARGET_SAMPLES_S, "cached_reload_s": TARGET_RELOAD_S,
                         "met": best_rate >= TARGET_SAMPLES_S and result["cached_reload_s"] < TARGET_RELOAD_S}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-image", type=int, default=160)
    p.add_argument("--n-audio", type=int, default=160)
    p.add_argument("--n-mixed", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_throughput.json"))
    args = p.parse_args(argv)
    r = run(args.n_image, args.n_audio, args.n_mixed, args.repeats)
    print(f"{'num_proc':>8} {'records':>8} {'seconds':>8} {'samples/s':>10} {'cpu s':>8} "
          f"{'samples/cpu-s':>14}")
    for k, v in r["num_proc"].items():
        print(f"{k:>8} {v['records']:>8} {v['seconds']:>8.2f} {v['samples_per_s']:>10.1f} "
              f"{v['cpu_seconds']:>8.2f} {v['samples_per_cpu_s']:>14.1f}")
    print(f"cached reload: {r['cached_reload_s']:.3f} s   (load avg at start {r['load_avg_1m']:.1f} on "
          f"{r['cpu_count']} cores; targets >= {TARGET_SAMPLES_S:.0f} samples/s, reload < "
          f"{TARGET_RELOAD_S:.0f} s: {'met' if r['targets']['met'] else 'NOT met'})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
