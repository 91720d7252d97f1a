"""Edges of the command line found by a new user: flags that must be refused before any work
(exit status 2, one line naming the flag), and the checks that two files belong together.

`risloc bench`: an out-of-range --spectrum-scene, a --limit or a --method-option value for a
method that is not run or refuses it; `risloc evaluate`: estimates of another scenario, a --json
path in a missing folder. The benchmark's own warnings (a failed spectrum plot, failed order
rules) are printed with its summary."""

from __future__ import annotations

import pytest

import risloc
from risloc import bench, io
from risloc.cli import main
from risloc.estimators import register
from risloc.scenes import Estimates

pytestmark = pytest.mark.usefixtures("one_thread")

_CALLS: list = []
"""Scenes per call of the counting estimator (any call means the benchmark started)."""


@register("edges-test-count")
def _count(scenes, *, x: int = 0):
    """K-hat = 0 everywhere; remembers each call; refuses a negative ``x`` as the estimators do."""
    if x < 0:
        raise ValueError(f"edges-test-count: x = {x}: must be >= 0")
    _CALLS.append(len(scenes))
    return Estimates.empty(len(scenes), scenes.scenario.k_max, method="count")


@register("edges-test-refuses-all")
def _refuses_all(scenes, *, x: int = 0):
    """Refuses every call, whatever its options: its failure is not the options' fault."""
    raise ValueError("edges-test-refuses-all: deliberately refuses every batch")


def _bench(tmp_path, *flags: str) -> list[str]:
    return ["bench", "--quick", "--scenes", "10", "--batch", "5", "--device", "cpu", "--out", str(tmp_path / "rep"),
            "--no-progress", "--no-crb", "--no-order-rules", "--latency-calls", "0", *flags]


# --- risloc bench ------------------------------------------------------------------------------
def test_bench_refuses_a_spectrum_scene_outside_the_scenes(tmp_path, capsys):
    _CALLS.clear()
    assert main(_bench(tmp_path, "--methods", "edges-test-count", "--spectrum-scene", "99")) == 2
    err = capsys.readouterr().err
    assert "risloc bench: error: --spectrum-scene 99: the benchmark has 10 scenes (0..9)" in err, err
    assert _CALLS == [] and not (tmp_path / "rep").exists()
    with pytest.raises(ValueError, match="spectrum_scene = -1: the benchmark has 10 scenes"):
        bench.BenchConfig(scenes=10, spectrum_scene=-1)


def test_bench_refuses_a_limit_for_a_method_not_run(tmp_path, capsys):
    _CALLS.clear()
    assert main(_bench(tmp_path, "--methods", "edges-test-count", "--limit", "ml=5")) == 2
    err = capsys.readouterr().err
    assert "--limit 'ml=5': 'ml' is not one of --methods (edges-test-count)" in err, err
    assert main(_bench(tmp_path, "--methods", "edges-test-count", "--limit", "edges-test-count=0")) == 2
    assert "--limit 'edges-test-count=0': N must be >= 1" in capsys.readouterr().err
    assert _CALLS == [] and not (tmp_path / "rep").exists()
    for field in ("limits", "method_options"):
        with pytest.raises(ValueError, match=rf"BenchConfig.{field}\['ml'\]: 'ml' is not one of methods \(music\)"):
            bench.BenchConfig(methods=("music",), **{field: {"ml": {"iterations": 2} if field == "method_options" else 5}})


def test_bench_refuses_a_method_option_value_up_front(tmp_path, capsys):
    _CALLS.clear()
    assert main(_bench(tmp_path, "--methods", "edges-test-count", "--method-option", "edges-test-count:x=-1")) == 2
    err = capsys.readouterr().err
    assert "risloc bench: error: --method-option: edges-test-count: x = -1: must be >= 0" in err, err
    assert not (tmp_path / "rep").exists()
    # learned's own check, as `risloc locate --option over=-1` meets it
    assert main(_bench(tmp_path, "--methods", "learned", "--method-option", "learned:over=-1")) == 2
    assert "--method-option: learned: over = -1: must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_bench_leaves_a_method_failing_without_its_options_to_the_report(tmp_path, capsys):
    """A method that refuses every call is not refused for its options: the benchmark runs and
    reports it as failed, as without options."""
    rc = main(_bench(tmp_path, "--methods", "edges-test-count,edges-test-refuses-all", "--no-plots",
                     "--method-option", "edges-test-refuses-all:x=1", "--method-option", "edges-test-count:x=2"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "WARNING: edges-test-refuses-all: failed: ValueError: edges-test-refuses-all: deliberately" in out, out


@pytest.mark.filterwarnings("ignore:No artists with labels")  # a method with K-hat = 0 has no curve to label
def test_bench_summary_names_a_failed_spectrum_plot_and_order_rules(monkeypatch, tmp_path):
    import risloc.bench.figures
    import risloc.estimators.order

    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken")

    monkeypatch.setattr(risloc.bench.figures, "spectrum_data", broken)
    monkeypatch.setattr(risloc.estimators.order, "order_estimates", broken)
    cfg = bench.BenchConfig(scenes=4, batch=4, methods=("edges-test-count",), crb=False, progress=False, device="cpu",
                            out=tmp_path / "rep", latency_calls=0)
    with pytest.warns(UserWarning, match="failed"):
        res = bench.run_benchmark(cfg)
    assert not (tmp_path / "rep" / "spectrum.png").exists()
    text = res.summary()
    assert "WARNING: order rules: failed: RuntimeError: deliberately broken" in text, text
    assert "WARNING: spectrum plot failed: RuntimeError: deliberately broken" in text, text


# --- risloc evaluate ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("edges") / "scenes.h5"
    io.save_scenes(risloc.simulate(risloc.Scenario(k_max=3), 3, seed=1), path)
    return path


def _estimates(path, scenario, n: int = 3):
    io.save_estimates(Estimates.empty(n, scenario.k_max, method="none"), path, scenario)
    return str(path)


def test_evaluate_refuses_estimates_of_another_scenario(scene_file, tmp_path, capsys):
    base = risloc.Scenario(k_max=3)
    for changes, named in (({"n_h": 8}, "n_h (12 vs 8)"), ({"k_max": 5}, "k_max (3 vs 5)"),
                           ({"n_h": 8, "r_max": 5.0}, "n_h (12 vs 8), r_max (10.0 vs 5.0)")):
        est = _estimates(tmp_path / "est.h5", base.replace(**changes))
        assert main(["evaluate", str(scene_file), est]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert (f"risloc evaluate: error: {est} does not hold estimates for {scene_file}: their scenarios differ in {named} "
                "(scene file vs estimates file)") in captured.err, captured.err
    # how the scenes were drawn may differ (an estimator run from Python may assume another SNR range)
    est = _estimates(tmp_path / "est.h5", base.replace(snr_db_min=10.0, ris_phase_noise_deg=5.0))
    assert main(["evaluate", str(scene_file), est]) == 0
    assert "## none on scenes.h5 (3 scenes)" in capsys.readouterr().out


def test_evaluate_refuses_a_json_path_in_a_missing_folder_before_any_work(scene_file, tmp_path, capsys):
    est = _estimates(tmp_path / "est.h5", risloc.Scenario(k_max=3))
    target = tmp_path / "nodir" / "x.json"
    assert main(["evaluate", str(scene_file), est, "--json", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"risloc evaluate: error: --json: folder {target.parent} does not exist (for {target})" in captured.err
    assert not target.parent.exists()
