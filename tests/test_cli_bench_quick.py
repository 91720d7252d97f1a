"""`risloc bench --quick` end to end on a few scenes (the CPU, every default method, the CRB,
the report folder): the path of the README's first command, on 6 scenes instead of 200."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

import risloc
from risloc import metrics
from risloc.bench import DEFAULT_METHODS
from risloc.cli import main
from risloc.seeds import HELD_OUT_SEED

N_SCENES = 6
LATENCY_CALLS = 1
RECOMPUTED = ("music", "mvdr", "subspacenet")
"""Methods whose rows are recomputed here from their own answer on the same scenes (cheap ones)."""


def test_bench_quick_writes_a_report_with_every_method(tmp_path, capsys):
    out = tmp_path / "bench-report"
    rc = main(["bench", "--quick", "--scenes", str(N_SCENES), "--batch", "3", "--device", "cpu", "--out", str(out), "--no-progress",
               "--latency-calls", str(LATENCY_CALLS)])
    printed = capsys.readouterr().out
    assert rc == 0
    for name in ("report.md", "results.json", "rmse_vs_snr.png", "success_vs_snr.png", "k_confusion.png", "spectrum.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    d = json.loads((out / "results.json").read_text())
    assert d["quick"] is True and d["n_scenes"] == N_SCENES
    assert list(d["methods"]) == list(DEFAULT_METHODS)
    report = (out / "report.md").read_text()
    assert d["config"]["latency_calls"] == LATENCY_CALLS
    scenes = risloc.simulate(risloc.Scenario(), N_SCENES, seed=HELD_OUT_SEED)
    K = scenes.truth.K.numpy()
    for name, m in d["methods"].items():
        assert m["status"] == "ok", (name, m.get("reason"))
        o = m["score"]["overall"]
        assert o["n_scenes"] == N_SCENES and m["n_scenes"] == N_SCENES, name
        # the overall success is the scene-weighted mean of the per-K successes and the share of
        # the right counts with every source a hit
        by_k = m["score"]["by_k"]
        assert sum(c["n_scenes"] for c in by_k) == N_SCENES, name
        assert abs(sum(c["success"] * c["n_scenes"] for c in by_k) / N_SCENES - o["success"]) < 1e-12, name
        assert abs(m["misses"]["success_given_k"] * o["K_acc"] - o["success"]) < 1e-12 or o["K_acc"] == 0, name
        conf = np.array(m["k_confusion"])  # rows: true K
        assert conf.sum(1).tolist() == np.bincount(K, minlength=conf.shape[0]).tolist(), name
        t = m["timing"]
        assert t["warmup_scenes"] == 3 and t["scenes"] == 3 and abs(t["scenes_per_s"] - 3 / t["seconds"]) < 1e-9 * t["scenes_per_s"]
        lat = m["latency_ms"]
        assert lat["n"] == LATENCY_CALLS and len(lat["calls"]) == LATENCY_CALLS and 0 < lat["median"] <= lat["p90"], name
        assert f"| {name} |" in report and f"| {name} |" in printed, name
    # cheap methods: their rows are their own answers on the held-out scenes, rescored here
    inputs = dataclasses.replace(scenes, truth=None)
    for name in RECOMPUTED:
        torch.manual_seed(HELD_OUT_SEED)
        again = metrics.score(scenes, risloc.locate(inputs, name, batch=3)).overall
        o = d["methods"][name]["score"]["overall"]
        assert (again.success, again.K_acc, again.n_pairs) == (o["success"], o["K_acc"], o["n_pairs"]), name
    assert d["crb"]["status"] == "ok" and "CRB bound" in report
    # the source-counting table: every order rule, its K accuracy recomputed from the truth
    from risloc.estimators.order import SCENE_RULES

    rules = d["order_rules"]
    assert rules["status"] == "ok" and [r["rule"] for r in rules["accuracy"]] == list(SCENE_RULES)
    assert "## Source counting" in report and all(f"| {r} |" in report for r in SCENE_RULES)
    for r in rules["accuracy"]:
        assert abs(r["K_acc"] + r["K_under"] + r["K_over"] - 1.0) < 1e-9, r["rule"]
