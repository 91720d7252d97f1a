"""benchmarks/roofline_learned.py: its analytic FLOP counts against the operations that actually run
(FlopCounterMode for the network, a dispatch-mode counter for the products of the front end and of
the likelihood stage) on a small scenario on the CPU, and the JSON record it writes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import risloc
from risloc.grids import atom_norms, dictionary
from risloc.nn.networks.spectrum import matched_filter_spectra, spectrum_grid

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config", str(ROOT / "configs" / "spectrum-cpu-quick.toml"), "--set", "scenario.n_h=4", "--set", "scenario.n_v=4",
         "--set", "scenario.m_bs=4", "--set", "scenario.snapshots=4", "--set", "scenario.k_max=3", "--set", "model.width=8",
         "--set", "model.depth=1", "--set", "model.grid_phi=8", "--set", "model.grid_theta=4", "--set", "model.grid_rho=4",
         "--set", "model.pursuit=2"]


def _module():
    spec = importlib.util.spec_from_file_location("roofline_learned", ROOT / "benchmarks" / "roofline_learned.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


R = _module()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline") / "roofline.json"
    R.main(["--device", "cpu", "--batch", "3", "--repeats", "1", "--warmup", "0", "--peaks", "H100 SXM", "--out", str(out), *SMALL])
    return json.loads(out.read_text())


def _scenes(n=3, **fields):
    sc = risloc.Scenario(n_h=4, n_v=4, m_bs=4, snapshots=4, k_max=3, **fields)
    return risloc.simulate(sc, n, seed=5)


def test_atom_norm_products_match_the_shapes():
    """The atom norms are one [L M, N] x [N, Q] complex product per scene: 8 L M N Q real FLOPs as a
    complex matmul, three times that as the split-TF32 real product (which also runs on the CPU)."""
    s = _scenes()
    B, L, N = s.codes.shape
    M = s.H.shape[1]
    D = dictionary(s.scenario, (5, 3, 4)).D
    Q = D.shape[1]
    for split, factor in ((False, 1), (True, 3)):
        c = R.count_ops(lambda: atom_norms(s.H, s.codes, D, tensor_cores=split))
        assert c.matmul_flops == factor * 8 * B * L * M * N * Q
        assert R.dictionary_count(L, M, N, Q, split).products - R.dictionary_count(L, M, N, 0, split).products == factor * 8 * L * M * N * Q + factor * 8 * L * N * Q


@pytest.mark.parametrize("split", [False, True])
def test_front_end_count_matches_the_products_that_run(split):
    s = _scenes()
    B, L, N = s.codes.shape
    M = s.H.shape[1]
    grid = spectrum_grid(s.scenario, (8, 4, 4))
    J = 3
    c = R.count_ops(lambda: matched_filter_spectra(s.y, s.H, s.codes, grid, picks=J, tensor_cores=split))
    a = R.front_end_count(L, M, N, 8 * 4 * 4, J, split)
    assert c.matmul_flops == pytest.approx(B * a.products, rel=1e-12)
    assert a.useful == R.front_end_count(L, M, N, 8 * 4 * 4, J, False).products
    assert c.bytes >= B * a.bytes  # the eager code moves at least the tensors counted once


def test_record_counts_agree_with_the_counters(record):
    st = record["stages"]
    net = st["network"]
    assert net["analytic"]["flops"] == pytest.approx(net["counted"]["flop_counter_mode"], rel=0.03)
    for name in ("front_end", "likelihood_eval", "dictionary"):
        assert st[name]["analytic"]["flops_products"] == pytest.approx(st[name]["counted"]["matmul_flops"], rel=1e-9), name
    # the scan and the whole stage: the small products left out of the analytic count (start powers, range decision) are < 1 %
    for name in ("scan", "likelihood_stage"):
        assert st[name]["analytic"]["flops_products"] == pytest.approx(st[name]["counted"]["matmul_flops"], rel=0.01), name
    calls = st["likelihood_stage"]["calls"]
    assert calls["eval_deriv"] >= 4 and calls["dictionary"] == 1  # at least the start's refinement; one dictionary


def test_record_fields(record):
    assert record["batch"] == 3 and record["device"] == "cpu" and record["torch"] == torch.__version__
    assert record["peaks"]["name"] == "H100 SXM" and record["peaks"]["hbm_tbs"] == 3.35
    assert isinstance(record["commit"], str) and record["commit"]
    assert record["shapes"] == {"L": 4, "M": 4, "N": 16, "K_max": 3, "Q_front_end": 128, "Q_dictionary": 24 * 12 * 12, "pursuit": 2, "dictionary_reused": False,
                                "split_tf32": False}
    for name in ("front_end", "network", "start", "likelihood_stage", "likelihood_eval", "dictionary", "scan", "end_to_end"):
        r = record["stages"][name]
        assert r["scenes_per_s"] > 0 and r["us_per_scene"] > 0
        assert r["counted"]["ops_per_call"] > 0 and r["counted"]["bytes_eager"] > 0
        if name != "start":
            a = r["analytic"]
            assert a["flops"] > 0 and a["bytes"] > 0 and a["intensity_flop_per_byte"] == pytest.approx(a["flops"] / a["bytes"])
            assert r["achieved_tflops"] == pytest.approx(a["flops"] * r["scenes_per_s"] / 1e12)
            assert r["achieved_gbs"] == pytest.approx(a["bytes"] * r["scenes_per_s"] / 1e9)
            # the roofline against the named peaks (CPU timings: only the arithmetic is checked)
            pk = record["peaks"]
            t_c = a["flops_products"] / (pk["tf32_tensor_tflops"] * 1e12) + a["flops_other"] / (pk["fp32_tflops"] * 1e12)
            assert r["t_compute_us_per_scene"] == pytest.approx(t_c * 1e6)
            assert r["t_memory_us_per_scene"] == pytest.approx(r["counted"]["bytes_eager"] / (pk["hbm_tbs"] * 1e12) * 1e6)
            assert r["latency_floor_us_per_scene"] > 0
            assert r["bound"] == R.classify(r["us_per_scene"] / 1e6, t_c, r["t_memory_us_per_scene"] / 1e6,
                                            r["latency_floor_us_per_scene"] / 1e6)


def test_bound_classification():
    assert R.classify(1.0, 0.9, 0.2) == "compute"
    assert R.classify(1.0, 0.2, 0.5) == "memory bandwidth"
    assert R.classify(10.0, 1.0, 2.0) == "launch/latency"
    assert R.classify(10.0, 1.0, 2.0, 8.0) == "launch/latency"
    assert R.classify(10.0, 1.0, 2.0, 1.0) == "kernel efficiency"


def test_measured_peaks_give_a_dispatch_floor(tmp_path):
    """``--peaks measured`` (the CPU's default): rates measured on the machine, and each stage's
    dispatch floor = the operators one call dispatches x the measured cost of one, per scene."""
    out = tmp_path / "measured.json"
    R.main(["--device", "cpu", "--batch", "2", "--repeats", "1", "--warmup", "0", "--no-latency", "--out", str(out), *SMALL])
    rec = json.loads(out.read_text())
    pk = rec["peaks"]
    assert pk["name"] == "measured" and pk["tf32_tensor_tflops"] == pk["fp32_tflops"] > 0 and pk["hbm_tbs"] > 0
    assert 0 < pk["op_us"] < 1e3
    for name in ("front_end", "network", "likelihood_stage", "end_to_end"):
        r = rec["stages"][name]
        assert r["t_dispatch_us_per_scene"] == pytest.approx(r["counted"]["ops_per_call"] * pk["op_us"] / 2)
        assert r["bound"] in ("compute", "memory bandwidth", "launch/latency", "kernel efficiency")
