"""`risloc bench --quick` end to end on a few scenes (the CPU, every default method, the CRB,
the report folder): the path of the README's first command, on 6 scenes instead of 200."""

from __future__ import annotations

import json

from risloc.bench import DEFAULT_METHODS
from risloc.cli import main

N_SCENES = 6


def test_bench_quick_writes_a_report_with_every_method(tmp_path, capsys):
    out = tmp_path / "bench-report"
    rc = main(["bench", "--quick", "--scenes", str(N_SCENES), "--batch", "3", "--device", "cpu", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    for name in ("report.md", "results.json", "rmse_vs_snr.png", "success_vs_snr.png", "k_confusion.png", "spectrum.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    d = json.loads((out / "results.json").read_text())
    assert d["quick"] is True and d["n_scenes"] == N_SCENES
    assert list(d["methods"]) == list(DEFAULT_METHODS)
    report = (out / "report.md").read_text()
    for name, m in d["methods"].items():
        assert m["status"] == "ok", (name, m.get("reason"))
        o = m["score"]["overall"]
        assert o["n_scenes"] == N_SCENES and 0.0 <= o["success"] <= 1.0, name
        assert f"| {name} |" in report and f"| {name} |" in printed, name
    assert d["crb"]["status"] == "ok" and "CRB bound" in report
    # the source-counting table: every order rule, its K accuracy recomputed from the truth
    from risloc.estimators.order import SCENE_RULES

    rules = d["order_rules"]
    assert rules["status"] == "ok" and [r["rule"] for r in rules["accuracy"]] == list(SCENE_RULES)
    assert "## Source counting" in report and all(f"| {r} |" in report for r in SCENE_RULES)
    for r in rules["accuracy"]:
        assert abs(r["K_acc"] + r["K_under"] + r["K_over"] - 1.0) < 1e-9, r["rule"]
