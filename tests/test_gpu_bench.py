"""The prepared GPU run can't rot between GPU chances: its CPU dry run (the same code paths, the
tiny model) writes every figure the GPU run would. (What the device tool carries is checked by
`python benchmarks/gpu.py --preflight`, before a GPU call: a limit of that tool, not of the product.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu (dry run)" and {"transformers", "peft", "bitsandbytes"} <= set(r["versions"])
    # train part: the new attention at both lengths, three ablations, the plan next to each
    assert [x["seq_len"] for x in r["runs"]] == [160, 320]
    assert all("train.attention=blocked" in x["overrides"] for x in r["runs"])
    assert [x["overrides"][-1] for x in r["ablations"]] == [
        "train.attention=sdpa", "train.attention=sdpa_gqa", "train.mlp_tile_tokens=0", "train.offload_prefetch=true"]
    for run in r["runs"] + r["ablations"]:
        assert "error" not in run, run
        assert all(math.isfinite(x) for x in run["losses"]) and run["tokens_per_s"] > 0
        assert run["planned_gib"] > run["planned_reserved_gib"] >= run["planned_allocated_gib"] > 0
    assert r["hf_baseline"]["seq_len"] == 160 and r["hf_baseline"]["tokens_per_s"] > 0
    # long part: blocked ± attention tiles at the long length, then twice it tiled, each planned
    assert [(x["seq_len"], "train.tile_attention=true" in x["overrides"]) for x in r["long"]] == [
        (320, False), (320, True), (640, True)]
    for run in r["long"]:
        assert "error" not in run, run
        assert all(math.isfinite(x) for x in run["losses"]) and run["planned_gib"] > 0
    assert r["long"][1]["planned_gib"] <= r["long"][0]["planned_gib"]  # equal at this tiny scale (3 decimals)
    tp, peers = r["throughput"], r["peers"]
    assert tp["packed_rows"] < tp["samples"] and isinstance(tp["ours"], float)
    assert tp["ratio_vs_hf"] == pytest.approx(tp["ours"] / peers["hf_trainer_one_sample"]["tokens_per_s"], abs=1e-3)
    assert peers["hf_trainer_prepacked_rows"]["tokens_per_s"] > 0
    trl = peers["trl_sft_padding_free"]
    assert trl["tokens_per_s"] > 0 and trl["ours_same_text"] > 0, trl
    assert "64 MiB" in peers["unsloth"]["why"]
    # product part: DPO, drafter, GRPO (or why not), the load path
    o = r["objectives"]
    assert o["dpo"]["rows"] == 2 and all(math.isfinite(x) for x in o["dpo"]["losses"]), o["dpo"]
    assert o["drafter"]["continuation_tokens"] == 64 and all(math.isfinite(x) for x in o["drafter"]["losses"]), \
        o["drafter"]
    g = o["grpo"]
    assert g["group"] == 8 and g["new_tokens"] == 16 and all(math.isfinite(x) for x in g["losses"]), g
    for obj in ("dpo", "drafter", "grpo"):
        assert o[obj]["planned_gib"] > 0
    load = r["load_path"]
    assert load["shards"] > 1 and load["checkpoint_gib"] > 0, load
    assert load["host_ram_peak_gib"] >= load["host_ram_after_load_gib"] > 0, load
    assert load["load_seconds"] >= 0 and math.isfinite(load["first_step"]["losses"][0]), load


def test_merge_keeps_every_part(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"device": "X", "runs": [1]}))
    b.write_text(json.dumps({"device": "X", "objectives": {"dpo": {}}, "load_path": {"shards": 6}}))
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--merge", str(a), str(b),
                        "--out", str(out)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(out.read_text()) == {"device": "X", "runs": [1], "objectives": {"dpo": {}},
                                           "load_path": {"shards": 6}}
