"""risloc.bench / `risloc bench`: one small benchmark (music, a truth oracle, a method that raises,
an unknown method), its report files and their contents; strict mode; the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import risloc
from risloc import bench, metrics
from risloc.estimators import register
from risloc.nn.checkpoint import PACKAGED_MODELS
from risloc.scenes import Estimates

N_SCENES = 16
SEED = 7
LATENCY_CALLS = 3

_TRUTH: dict = {}


def _lookup(scenes):
    """Rows of the cached truth for a batch (matched on y, since estimators never see the truth)."""
    full = _TRUTH["scenes"]
    key = full.y[:, 0, 0]
    idx = [int(torch.nonzero(key == v)[0]) for v in scenes.y[:, 0, 0].cpu()]
    return full.truth[torch.tensor(idx)]


_ORACLE_BATCHES: list = []
"""Scenes per call of the oracle without a known K (the batches, then the latency calls)."""


@register("bench-test-oracle", k_option="K")
def _oracle(scenes, K=None, **_):
    assert scenes.truth is None, "the benchmark must not hand the truth to an estimator"
    if K is None:
        _ORACLE_BATCHES.append(len(scenes))
    t = _lookup(scenes)
    return Estimates(t.K.clone(), t.phi.clone(), t.theta.clone(), t.r.clone(), "oracle")


@register("bench-test-raise")
def _raises(scenes, **_):
    raise RuntimeError("deliberate failure for the test")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_thread):
    _TRUTH["scenes"] = risloc.simulate(risloc.Scenario(), N_SCENES, seed=SEED)
    out = tmp_path_factory.mktemp("bench")
    cfg = bench.BenchConfig(
        scenes=N_SCENES, seed=SEED, batch=8, out=out, device="cpu", progress=False, spectrum_grid=(31, 15, 4),
        methods=("music", "bench-test-oracle", "bench-test-raise", "no-such-method"), oracle_k=True,
        latency_calls=LATENCY_CALLS,
    )
    _ORACLE_BATCHES.clear()
    with pytest.warns(UserWarning, match="risloc bench"):
        res = bench.run_benchmark(cfg)
    _TRUTH["oracle_batches"] = list(_ORACLE_BATCHES)
    return res, out


def test_statuses(result):
    res, _ = result
    m = res.methods
    assert list(m) == ["music", "bench-test-oracle", "bench-test-raise", "no-such-method", "music (K known)",
                       "bench-test-oracle (K known)"]  # known-K rows for the methods that accept K
    assert m["music"].ok and m["bench-test-oracle"].ok
    assert m["bench-test-raise"].status == bench.FAILED
    assert "deliberate failure" in m["bench-test-raise"].reason
    assert m["no-such-method"].status == bench.NOT_RUN
    assert "no-such-method" in m["no-such-method"].reason
    assert res.crb_status == bench.OK and len(res.crb) == N_SCENES


def test_same_scenes_and_oracle_scores(result):
    res, _ = result
    # the held-out scenes are the seed's stream, drawn on the CPU
    assert torch.equal(res.scenes.y, _TRUTH["scenes"].y)
    o = res.methods["bench-test-oracle"].score.overall
    assert o.n_scenes == N_SCENES
    assert o.success == 1.0 and o.K_acc == 1.0 and o.K_under == 0.0 and o.K_over == 0.0
    assert o.rmse_phi_deg == 0.0 and o.rmse_r_m == 0.0
    assert o.crb_ratio_phi == 0.0 and o.success_crb is not None and 0 < o.success_crb <= 1
    mu = res.methods["music"]
    assert len(mu.estimates) == N_SCENES
    # music's row is music's answer on these scenes, and its success is the fraction of scenes
    # with K-hat = K and every true source hit, recounted from the matched pairs
    again = risloc.locate(dataclasses.replace(_TRUTH["scenes"], truth=None), "music", batch=8)
    assert torch.equal(again.K, mu.estimates.K)
    assert torch.allclose(again.phi, mu.estimates.phi, equal_nan=True) and torch.allclose(again.r, mu.estimates.r, equal_nan=True)
    m = metrics.match(res.scenes.truth, mu.estimates)
    hits = np.bincount(m.scene[m.hit.astype(bool)], minlength=N_SCENES)
    success = float(((m.K_hat == m.K) & (hits == m.K)).mean())
    assert mu.score.overall.success == success
    assert o.n_scenes == N_SCENES and mu.score.overall.n_scenes == N_SCENES
    # timing: first batch of 8 is warm-up, the second timed; scenes/s is timed scenes over timed seconds
    t = mu.timing
    assert t.warmup_scenes == 8 and t.scenes == 8 and t.batches == 1 and t.passes == [t.seconds]
    assert 0 < t.seconds and t.scenes_per_s == 8 / t.seconds


def test_crb_reference_matches_metrics(result):
    res, _ = result
    t, c = res.scenes.truth, res.crb
    ref = bench.crb_reference(t, c)
    assert ref["n_sources"] == int(t.K.sum())
    assert math.isclose(ref["success_crb"], res.methods["music"].score.overall.success_crb, rel_tol=1e-12)
    active = torch.arange(c.phi.shape[1]).view(1, -1) < t.K.view(-1, 1)
    rms = math.degrees(math.sqrt(float(c.phi.double()[active].square().mean())))
    assert math.isclose(ref["rms_sqrt_crb_phi"], rms, rel_tol=1e-6)
    # the CRB-efficient success is what the scoring gives to estimates drawn around the truth
    # with errors N(0, CRB): R replicas of each scene, Monte Carlo sd <= sqrt(0.25 / (R S)) = 0.004
    R = 1000
    rep = lambda x: x.repeat(R, *([1] * (x.dim() - 1)))
    g = torch.Generator().manual_seed(0)

    def draw(x, sd):
        return rep(x) + rep(torch.nan_to_num(sd.float(), nan=0.0, posinf=1e6)) * torch.randn(rep(x).shape, generator=g)

    est = Estimates(rep(t.K).clone(), draw(t.phi, c.phi), draw(t.theta, c.theta), draw(t.r, c.r), "crb-draws")
    s = res.scenes
    many = risloc.Scenes(rep(s.y), rep(s.H), rep(s.codes), s.scenario, rep(s.snr_db), t[torch.arange(len(s)).repeat(R)])
    assert abs(risloc.evaluate(many, est).overall.success - ref["success_crb"]) < 0.02


def test_files_exist(result):
    _, out = result
    for name in ("report.md", "results.json", "rmse_vs_snr.png", "success_vs_snr.png", "k_confusion.png", "spectrum.png"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 0, name
    for p in ("rmse_vs_snr.png", "spectrum.png"):
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_report_tables(result):
    res, out = result
    text = (out / "report.md").read_text()
    for heading in ("## Overall", "## SNR 10…20 dB", "## SNR -5…20 dB", "## Per SNR bin (5 dB)", "## Per true K", "## Methods"):
        assert heading in text, heading
    for col in ("success / CRB-eff.", "K acc", "K under", "K over", "RMSE φ (°)", "φ RMSE/√CRB", "r RMSE/√CRB", "scenes/s"):
        assert col in text, col
    assert "| CRB bound ¹ |" in text
    assert "not run: unknown method 'no-such-method'" in text
    assert "failed: RuntimeError: deliberate failure for the test" in text
    assert res.device["name"] in text
    # one table per K present
    for k in np.unique(res.scenes.truth.K.numpy()):
        assert f"### K = {k}" in text
    assert "![spectrum.png](spectrum.png)" in text
    for heading in ("## Per range of the farthest source", "## Per closest-pair separation", "## Missed sources vs wrong positions",
                    "## Success / K accuracy per SNR bin and true K", "| music (K known) |"):
        assert heading in text, heading
    assert f"seed {SEED}, not the held-out seed" in text
    # the oracle's overall row: success 1, K acc 1
    overall = text.split("## Overall", 1)[1]
    row = next(line for line in overall.splitlines() if line.startswith("| bench-test-oracle |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1.00" and cells[3] == "1.00"


def test_results_json(result):
    res, out = result
    d = json.loads((out / "results.json").read_text())
    for key in ("seeds", "scenario", "config", "versions", "device", "git", "started", "finished", "methods", "crb", "timing_rules"):
        assert key in d, key
    assert d["seeds"]["scenes"] == SEED and d["n_scenes"] == N_SCENES
    assert d["scenario"] == risloc.Scenario().to_dict()
    assert set(d["versions"]) >= {"risloc", "torch", "numpy", "python"}
    assert d["git"]["commit"]
    m = d["methods"]
    assert m["no-such-method"]["status"] == "not run"
    assert m["bench-test-raise"]["status"] == "failed" and "deliberate" in m["bench-test-raise"]["reason"]
    assert "RuntimeError" in m["bench-test-raise"]["traceback"]
    music = m["music"]
    assert music["status"] == "ok" and music["timing"]["scenes_per_s"] == res.methods["music"].timing.scenes_per_s
    assert music["score"]["overall"]["success"] == res.methods["music"].score.overall.success
    assert set(music["score"]) >= {"overall", "by_snr", "by_k"}
    assert {r["snr_lo"] for r in music["snr_ranges"]} == {10.0, -5.0}
    assert "order_rule" in music["defaults"]
    assert np.array(music["k_confusion"]).sum() == N_SCENES
    assert m["bench-test-oracle"]["score"]["overall"]["success"] == 1.0
    assert d["crb"]["reference"]["overall"]["n_scenes"] == N_SCENES
    # known K: the answer's K is the truth's
    mk = m["music (K known)"]
    assert mk["known_k"] and mk["method"] == "music" and mk["score"]["overall"]["K_acc"] == 1.0
    # range and separation buckets partition the scenes; the oracle hits every source
    b = {x["key"]: x for x in m["bench-test-oracle"]["buckets"]}
    assert sum(b[k]["n_scenes"] for k in b if k.startswith("range_")) == N_SCENES
    assert sum(b[k]["n_scenes"] for k in b if k.startswith("sep_")) == N_SCENES
    assert all(x["success"] == 1.0 for x in b.values() if x["n_scenes"])
    hits = m["bench-test-oracle"]["source_hits_by_range"]
    assert sum(h["n_sources"] for h in hits) == int(res.scenes.truth.K.sum()) and all(h["hits"] == h["n_sources"] for h in hits)
    mis = m["music"]["misses"]
    assert math.isclose(mis["K_acc"] + mis["K_under"] + mis["K_over"], 1.0)
    assert mis["success"] <= mis["K_acc"] + 1e-12
    cells = m["music"]["by_snr_k"]
    assert sum(c["n_scenes"] for c in cells) == N_SCENES
    assert d["seeds"]["role"] == "other" and d["seeds"]["held_out"] is False
    assert d["finished"] >= d["started"]


def test_strict_reraises():
    with pytest.raises(RuntimeError, match="deliberate"):
        bench.run_benchmark(bench.BenchConfig(scenes=4, batch=4, methods=("bench-test-raise",), out=None,
                                              crb=False, strict=True, progress=False, device="cpu"))


def test_cli(tmp_path, capsys):
    from risloc.cli import main

    _TRUTH["scenes"] = risloc.simulate(risloc.Scenario(signal="static"), 6, seed=SEED)
    out = tmp_path / "rep"
    rc = main(["bench", "--scenes", "6", "--batch", "3", "--seed", str(SEED), "--methods", "bench-test-oracle,learned",
               "--out", str(out), "--no-plots", "--no-crb", "--no-progress", "--device", "cpu",
               "--set", "k_max=5", "--signal", "static", "--method-option", "learned:relax=0",
               "--method-option", 'learned:ml_options={"iterations": 2}', "--timing-repeats", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "## Overall" in text and "bench-test-oracle" in text
    d = json.loads((out / "results.json").read_text())
    assert d["scenario"]["signal"] == "static" and d["n_scenes"] == 6
    assert d["methods"]["learned"]["status"] == "ok"  # the packaged default weights (a method without any: test_method_checkpoints)
    assert d["methods"]["learned"]["options"] == {"relax": 0, "ml_options": {"iterations": 2}}
    assert d["config"]["timing_repeats"] == 2 and len(d["methods"]["learned"]["timing"]["passes"]) == 2
    assert (out / "report.md").is_file()
    from risloc.cli.bench import _method_options

    # options with a flag of risloc locate but none of risloc bench pass; bench's own flags are named
    assert _method_options(["music:order_rule=aic", "music:use_snr=false"], "music,ml") == {"music": {"order_rule": "aic", "use_snr": False}}
    for item, message in (("mvdr:relax=0", "not one of --methods"), ("learned:nope=1", "learned has no option 'nope'"),
                          ("relax=0", "expected NAME:KEY=VALUE"), ("learned:checkpoint=x.pt", "use --checkpoint or --method-checkpoint"),
                          ("learned:K=2", "use --oracle-k")):
        assert main(["bench", "--scenes", "6", "--methods", "learned", "--out", str(out), "--method-option", item]) == 2
        assert message in capsys.readouterr().err


@register("bench-test-needs-checkpoint", learned=True)
def _needs_checkpoint(scenes, *, checkpoint=None, **_):
    """A learned method without packaged weights: returns K-hat = 0, remembers its checkpoint."""
    _SEEN_CHECKPOINTS.append(checkpoint)
    return Estimates.empty(len(scenes), scenes.scenario.k_max, method="needs-checkpoint")


_SEEN_CHECKPOINTS: list = []


def test_method_checkpoints(tmp_path):
    base = dict(scenes=4, batch=4, methods=("bench-test-needs-checkpoint",), out=None, crb=False, progress=False, device="cpu")
    with pytest.warns(UserWarning, match="risloc bench"):
        res = bench.run_benchmark(bench.BenchConfig(**base))
    m = res.methods["bench-test-needs-checkpoint"]
    assert m.status == bench.NOT_RUN and "--method-checkpoint bench-test-needs-checkpoint=CKPT" in m.reason
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not read by the fake estimator")
    _SEEN_CHECKPOINTS.clear()
    res = bench.run_benchmark(bench.BenchConfig(**base, method_checkpoints={"bench-test-needs-checkpoint": str(ckpt)}))
    assert res.methods["bench-test-needs-checkpoint"].status == bench.OK
    assert _SEEN_CHECKPOINTS and set(_SEEN_CHECKPOINTS) == {str(ckpt)}
    _SEEN_CHECKPOINTS.clear()  # a packaged model's name reaches the method as its file
    res = bench.run_benchmark(bench.BenchConfig(**base, method_checkpoints={"bench-test-needs-checkpoint": "mixed"}))
    assert res.methods["bench-test-needs-checkpoint"].status == bench.OK
    assert _SEEN_CHECKPOINTS and set(_SEEN_CHECKPOINTS) == {str(PACKAGED_MODELS / "mixed.pt")}
    with pytest.raises(FileNotFoundError, match="--method-checkpoint"):
        bench.run_benchmark(bench.BenchConfig(**base, method_checkpoints={"bench-test-needs-checkpoint": str(tmp_path / "missing.pt")}))


def test_bucket_geometry():
    """Closest-pair separation and farthest range on hand-made truths; the beamwidth formula."""
    from types import SimpleNamespace as Truth

    from risloc.bench import report

    nan = math.nan
    d = math.radians
    truth = Truth(
        K=torch.tensor([1, 3, 2]),
        phi=torch.tensor([[0.1, nan, nan], [0.0, d(30), d(4)], [d(-20), d(20), nan]], dtype=torch.float64),
        theta=torch.tensor([[0.0, nan, nan], [0.0, 0.0, 0.0], [0.0, 0.0, nan]], dtype=torch.float64),
        r=torch.tensor([[3.0, nan, nan], [1.0, 5.0, 0.7], [2.0, 2.5, nan]], dtype=torch.float64),
    )
    sep = report.closest_pair_separation(truth)
    assert math.isnan(sep[0]) and math.isclose(sep[1], d(4), rel_tol=1e-9) and math.isclose(sep[2], d(40), rel_tol=1e-9)
    assert report.farthest_range(truth).tolist() == [3.0, 5.0, 2.5]
    assert math.isclose(math.degrees(report.beamwidth(risloc.Scenario())), 8.46, abs_tol=0.01)


def test_seeds_are_distinct_and_match_training():
    from risloc import seeds
    from risloc.nn.config import TrainConfig

    cfg = TrainConfig()
    assert (cfg.seed, cfg.val_seed) == (seeds.TRAINING_SEED, seeds.TRAINING_VALIDATION_SEED)
    everything = [seeds.HELD_OUT_SEED, seeds.TRAINING_SEED, seeds.TRAINING_VALIDATION_SEED, *seeds.VALIDATION_SEEDS]
    assert len(set(everything)) == len(everything)
    assert bench.BenchConfig().seed == seeds.HELD_OUT_SEED and seeds.role(seeds.HELD_OUT_SEED) == "held-out"


def test_timing_repeats_time_every_pass_and_report_the_median():
    """--timing-repeats R: the timed batches run R times (the warm-up once), the results are the
    first pass's, the time is the median pass; R < 1 is refused."""
    from risloc.bench.run import timed_batches

    scenes = risloc.simulate(risloc.Scenario(), 10, seed=SEED)
    calls = []

    def fn(s):
        calls.append(len(s))
        return Estimates(torch.full((len(s),), len(calls)), *(torch.zeros(len(s), 1) for _ in range(3)))

    out, timing = timed_batches(fn, scenes, 4, torch.device("cpu"), progress=False, repeats=3)
    assert calls == [4, 4, 2] + [4, 2] * 2  # warm-up batch once, timed batches (4 + 2 scenes) three times
    assert out.K.tolist() == [1] * 4 + [2] * 4 + [3] * 2  # the first pass's results
    assert len(timing.passes) == 3 and timing.scenes == 6 and timing.batches == 2
    assert timing.seconds == sorted(timing.passes)[1]
    one = timed_batches(fn, scenes[:3], 4, torch.device("cpu"), progress=False, repeats=2)[1]
    assert len(one.passes) == 2 and one.scenes == 3  # a single batch: warm-up, then timed twice
    with pytest.raises(ValueError, match="timing_repeats"):
        bench.BenchConfig(timing_repeats=0)


def test_one_scene_latency(result):
    """Every method row (not the K-known ones) has a latency over LATENCY_CALLS single-scene calls
    after one warm-up; results.json and the report carry median and p90."""
    res, out = result
    # the oracle saw its two batches of 8, then 1 + LATENCY_CALLS batches of one scene
    assert _TRUTH["oracle_batches"] == [8, 8] + [1] * (1 + LATENCY_CALLS)
    d = json.loads((out / "results.json").read_text())["methods"]
    text = (out / "report.md").read_text()
    f = metrics.format_number
    for name in ("music", "bench-test-oracle"):
        lat = res.methods[name].latency
        assert lat.n == LATENCY_CALLS and len(lat.calls_s) == LATENCY_CALLS and lat.warmup_s > 0
        j = d[name]["latency_ms"]
        assert j["n"] == LATENCY_CALLS and j["unit"] == "ms"
        assert math.isclose(j["median"], 1e3 * float(np.median(lat.calls_s)))
        assert math.isclose(j["p90"], 1e3 * float(np.percentile(lat.calls_s, 90)))
        assert min(j["calls"]) <= j["median"] <= j["p90"] <= max(j["calls"])
        assert f"| {f(j['median'])} / {f(j['p90'])} |" in text
    for name in ("music (K known)", "bench-test-raise", "no-such-method"):
        assert d[name]["latency_ms"] is None and res.methods[name].latency is None
    assert "latency (ms) median / p90" in text


def test_latency_calls_option():
    from risloc.bench.run import one_scene_latency

    calls = []

    def fn(s):
        calls.append(int(s.y.shape[0]))
        return Estimates.empty(len(s), 5)

    scenes = risloc.simulate(risloc.Scenario(), 3, seed=SEED)
    lat = one_scene_latency(fn, scenes, 7, torch.device("cpu"))
    assert calls == [1] * 8 and lat.n == 7 and lat.median_ms <= lat.p90_ms
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="latency_calls"):
            bench.BenchConfig(latency_calls=bad)
    _TRUTH["scenes"] = scenes
    res = bench.run_benchmark(bench.BenchConfig(scenes=3, seed=SEED, batch=4, methods=("bench-test-oracle",), out=None, crb=False,
                                                progress=False, device="cpu", latency_calls=0, order_rules=False))
    assert res.methods["bench-test-oracle"].ok and res.methods["bench-test-oracle"].latency is None


def test_learned_latency_loads_the_checkpoint_once(monkeypatch):
    """The single-scene calls of a learned method reuse the loaded checkpoint: one load for the
    batches and every latency call."""
    from risloc.nn import inference

    loads = []
    real = inference.load_model

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "_CACHE", {})
    monkeypatch.setattr(inference, "load_model", counting)
    res = bench.run_benchmark(bench.BenchConfig(scenes=2, seed=SEED, batch=2, methods=("learned",), out=None, crb=False,
                                                progress=False, device="cpu", latency_calls=2, order_rules=False))
    assert res.methods["learned"].ok and res.methods["learned"].latency.n == 2
    assert len(loads) == 1
