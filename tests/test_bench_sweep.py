"""risloc.bench sweeps / `risloc bench --sweep`: one row per level, the same scenes at every level of
an impairment, each level's numbers rescored independently, the CRB-efficient reference of the
ideal model (known H and codes), several sweeps in one call, bad input refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import risloc
from risloc import bench, metrics
from risloc.cli import main
from risloc.crb import crb, crb_for_scenes

N_SCENES = 16
SEED = 7
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phase_noise(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("sweep")
    cfg = bench.BenchConfig(scenes=N_SCENES, seed=SEED, batch=8, methods=("music",), device="cpu", out=out, progress=False,
                            order_rules=False, spectrum_grid=(15, 7, 2), sweeps=("ris_phase_noise_deg=0,20",))
    (res,) = bench.run_sweeps(cfg)
    return res, out


def test_files_one_row_per_level(phase_noise):
    res, out = phase_noise
    for name in ("sweep.json", "sweep.md", "sweep_success.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "sweep_success.png").read_bytes()[:8] == PNG
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    d = json.loads((out / "sweep.json").read_text())
    assert d["field"] == "ris_phase_noise_deg" and d["values"] == [0.0, 20.0] and d["complete"] is True
    assert d["seed"] == SEED and d["n_scenes"] == N_SCENES and d["git"]["commit"]
    assert d["config"]["sweeps"] == [{"field": "ris_phase_noise_deg", "values": [0.0, 20.0]}]
    assert [lv["label"] for lv in d["levels"]] == ["0", "20"]
    # each level's full report, in its own folder, ran on that level's scenario
    for lv, value in zip(d["levels"], (0.0, 20.0)):
        sub = json.loads((out / lv["report"] / "results.json").read_text())
        assert sub["scenario"]["ris_phase_noise_deg"] == value and sub["n_scenes"] == N_SCENES
        assert (out / lv["report"] / "report.md").is_file() and f"]({lv['report']}/report.md)" in (out / "sweep.md").read_text()
        assert sub["methods"]["music"]["score"]["overall"]["success"] == lv["methods"]["music"]["success"]
    text = (out / "sweep.md").read_text()
    success = text.split("## Success\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in success.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert rows[0] == "| ris_phase_noise_deg | music | CRB-efficient (ideal model) |"
    f = metrics.format_number
    assert rows[1:] == [f"| {lv['label']} | {f(lv['methods']['music']['success'])} | {f(lv['crb']['success'])} |" for lv in d["levels"]]


def test_same_scenes_at_every_level(phase_noise):
    """Phase noise changes the realised codes (so the snapshots) and nothing drawn before them."""
    res, _ = phase_noise
    a, b = (r.scenes for r in res.results)
    for name in ("K", "phi", "theta", "r", "power"):
        assert torch.equal(torch.nan_to_num(getattr(a.truth, name)), torch.nan_to_num(getattr(b.truth, name))), name
    assert torch.equal(a.H, b.H) and torch.equal(a.codes, b.codes) and torch.equal(a.snr_db, b.snr_db)
    assert a.truth.codes is None and b.truth.codes is not None and not torch.equal(b.truth.codes, b.codes)
    assert not torch.equal(a.y, b.y)
    same = [lv["same_as_first"] for lv in res.levels]
    assert all(same[0].values())
    assert same[1]["positions"] and same[1]["K"] and same[1]["receiver_H"] and same[1]["codes"]
    assert not same[1]["realised_codes"] and not same[1]["y"]


def test_levels_rescored_independently(phase_noise):
    """Each level's row is music on that level's scenes, and the reference is the CRB-efficient
    success of the ideal model (known H and commanded codes), not of the realised codes."""
    res, _ = phase_noise
    for lv, value in zip(res.levels, (0.0, 20.0)):
        scenes = risloc.simulate(risloc.Scenario(ris_phase_noise_deg=value), N_SCENES, seed=SEED)
        torch.manual_seed(SEED)
        est = risloc.locate(dataclasses.replace(scenes, truth=None), "music", batch=8)
        again = metrics.score(scenes, est).overall
        m = lv["methods"]["music"]
        assert (m["success"], m["K_acc"], m["n_pairs"], m["n_scenes"]) == (again.success, again.K_acc, again.n_pairs, N_SCENES)
        ideal = float(np.nanmean(metrics.crb_success_probability(scenes.truth, crb_for_scenes(scenes))))
        assert lv["crb"]["success"] == pytest.approx(ideal, rel=1e-12)
        assert lv["crb"]["label"] == bench.CRB_LABEL == "CRB-efficient (ideal model)"
        if value:
            t = scenes.truth
            realised = crb(scenes.H, t.codes, t.phi, t.theta, t.r, t.power, t.noise_var, scenes.scenario, K=t.K)
            assert abs(float(np.nanmean(metrics.crb_success_probability(t, realised))) - ideal) > 1e-3


def test_cli_several_sweeps_and_flags(tmp_path, capsys):
    out = tmp_path / "sw"
    rc = main(["bench", "--quick", "--scenes", "8", "--batch", "4", "--seed", str(SEED), "--methods", "music", "--device", "cpu",
               "--out", str(out), "--no-progress", "--no-plots", "--no-order-rules", "--oracle-k", "--limit", "music=6",
               "--set", "snr_db_min=10", "--set", "snr_db_max=20",
               "--sweep", "signal=stochastic,static", "--sweep", "code_bits=1,3"])
    printed = capsys.readouterr().out
    assert rc == 0
    for field, labels in (("signal", ["stochastic", "static"]), ("code_bits", ["1", "3"])):
        d = json.loads((out / field / "sweep.json").read_text())
        assert d["field"] == field and [lv["label"] for lv in d["levels"]] == labels and d["config"]["quick"] is True
        assert d["scenario"]["snr_db_min"] == 10.0 and d["scenario"]["snr_db_max"] == 20.0
        for lv in d["levels"]:
            assert set(lv["methods"]) == {"music", "music (K known)"}
            assert lv["methods"]["music"]["n_scenes"] == 6 and lv["methods"]["music (K known)"]["K_acc"] == 1.0
            assert lv["same_as_first"]["positions"] and lv["same_as_first"]["snr_db"]
            sub = json.loads((out / field / lv["report"] / "results.json").read_text())
            assert sub["scenario"][field] == lv["value"] and sub["scenario"]["snr_db_min"] == 10.0
        assert f"## sweep {field}: success" in printed
        assert all(f"| {label} |" in (out / field / "sweep.md").read_text() for label in labels)
        assert not (out / field / "sweep_success.png").exists()  # --no-plots
    assert not (out / "sweep.json").exists()  # several sweeps: one folder each


@pytest.mark.parametrize("args, message", [
    (["--sweep", "no_such_field=1,2"], "unknown Scenario field 'no_such_field'"),
    (["--sweep", "code_bits=1,x"], "value 'x' of code_bits"),
    (["--sweep", "code_bits=0,3"], "Scenario.code_bits = 0"),
    (["--sweep", "signal=stochastic,foo"], "value 'foo' of signal"),
    (["--sweep", "snapshots="], "give at least one value of snapshots"),
    (["--sweep", "snapshots"], "expected FIELD=V1,V2"),
    (["--sweep", "snapshots=8,8"], "the value 8 is given twice"),
    (["--sweep", "snapshots=8", "--sweep", "snapshots=16"], "'snapshots' is swept twice"),
    (["--latency-calls", "-1"], "latency_calls"),
])
def test_bad_input_refused(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["bench", "--scenes", "4", "--methods", "music", "--device", "cpu", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_api_refusals():
    with pytest.raises(ValueError, match="run_sweeps"):
        bench.run_benchmark(bench.BenchConfig(scenes=2, out=None, sweeps=("snapshots=8",)))
    with pytest.raises(ValueError, match="at least one sweep"):
        bench.run_sweeps(bench.BenchConfig(scenes=2, out=None))
    s = bench.Sweep.parse("csi_nmse_db=none,-20", risloc.Scenario())
    assert s == bench.Sweep("csi_nmse_db", (None, -20.0)) and [bench.Sweep.text(v) for v in s.values] == ["none", "-20"]
