"""The network plug-in contract of risloc.nn: no import circle, kinds by name, code defaults = the
shipped model, known K for the learned estimators, packaged weights reproduce their reference."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import risloc
from risloc.estimators import get
from risloc.nn.checkpoint import load_checkpoint
from risloc.nn.config import TrainConfig, apply_overrides
from risloc.nn.inference import DEFAULT_WEIGHTS, Calibration, locate_from_prediction
from risloc.nn.inputs import prepare_inputs
from risloc.nn.networks import available, get_network

ROOT = Path(__file__).resolve().parent.parent
NN = ROOT / "src" / "risloc" / "nn"
SC = risloc.Scenario()


def _nn_modules() -> dict[str, Path]:
    out = {}
    for path in sorted(NN.rglob("*.py")):
        rel = path.relative_to(NN.parent.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The risloc.nn modules ``name`` imports anywhere in its file (module level or inside functions)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (base + "." + node.module if node.module else base) if node.level else node.module
            cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        for c in cands:
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name and not (name.startswith(c + ".") and path.name != "__init__.py" and c == pkg):
                found.add(c)
    return found


def test_no_import_circle_inside_nn():
    """The import graph of risloc.nn (every import statement, also inside functions; a kind module
    importing its own package's registry excepted) has no cycle, and every module imports alone in
    a fresh interpreter."""
    mods = _nn_modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    assert "risloc.nn.inputs" in graph and not (graph["risloc.nn.inputs"] - {"risloc.nn", "risloc.nn.config"})
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError(f"import circle: {' -> '.join(stack + [m, n])}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    # every entry point first, alone, in a fresh interpreter (the leaves of the graph are imported
    # first by those). One interpreter imports the third-party libraries once, then forks a child per
    # entry point, which starts with no risloc module loaded and imports only that one.
    firsts = ["risloc.nn.inputs", "risloc.nn.networks", "risloc.nn.networks.spectrum", "risloc.nn.loss", "risloc.nn.train",
              "risloc.nn.inference", "risloc.nn.subspacenet"]
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": ""}
    p = subprocess.run([sys.executable, "-c", FORK_IMPORTS, *firsts], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.split() == [f"ok:{m}" for m in firsts]


FORK_IMPORTS = """
import importlib, os, sys, traceback
import h5py, numpy, scipy.optimize, torch  # third-party only: no risloc module before the fork
assert not [m for m in sys.modules if m == "risloc" or m.startswith("risloc.")]
failed = 0
for name in sys.argv[1:]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        print("ok:" + name, flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        print(name, "failed to import first", file=sys.stderr)
        failed += 1
sys.exit(1 if failed else 0)
"""


def test_code_defaults_are_the_shipped_model():
    """The code's training defaults are the base network's run (configs/default.toml, default.pt);
    the packaged default of learned is that network fine-tuned by configs/mixed.toml (mixed.pt)."""
    from risloc.nn.inference import BASE_WEIGHTS

    shipped = TrainConfig.from_toml(load_checkpoint(BASE_WEIGHTS)["config"])
    assert TrainConfig().to_dict() == shipped.to_dict()
    assert TrainConfig.load(ROOT / "configs" / "default.toml").to_dict() == shipped.to_dict()
    mixed = TrainConfig.from_toml(load_checkpoint(DEFAULT_WEIGHTS)["config"])
    assert DEFAULT_WEIGHTS.name == "mixed.pt" and mixed.init == "default" and mixed.model == shipped.model


def _tiny_model_config(kind: str) -> TrainConfig:
    sizes = {
        "spectrum": {"model.width": 4, "model.depth": 1, "model.k_hidden": 8, "model.grid_phi": 8, "model.grid_theta": 4,
                     "model.grid_rho": 4, "model.pursuit": 2},
        "covariance": {"model.width": 16, "model.depth": 1, "model.heads": 2, "model.patch": 4, "model.k_hidden": 16},
        "subspacenet": {"model.width": 8, "model.k_hidden": 8},
    }[kind]
    return apply_overrides(TrainConfig(), {"model.kind": kind, "loss.main": get_network(kind).mains[0], **sizes})


@pytest.mark.parametrize("kind", ["spectrum", "covariance", "subspacenet"])
def test_every_kind_supplies_the_contract(kind):
    assert kind in available()
    k = get_network(kind)
    cfg = _tiny_model_config(kind)
    torch.manual_seed(0)
    model = k.build(SC, cfg.model)
    s = risloc.simulate(SC, 4, seed=31)
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=cfg.loss.regularisation)
    opts = cfg.covariance_options(0.0)
    pred = model(inputs, opts)
    assert pred.kind == kind and pred.k_logits.shape == (4, SC.k_max)
    main = k.main_loss(cfg.loss.main, pred, inputs, opts, s.truth, risloc.source_factor(s.truth, SC), cfg.loss, SC)
    assert main.shape == (4,) and torch.isfinite(main).all()
    main.mean().backward()
    with pytest.raises(ValueError, match="supports"):
        k.main_loss("nope", pred, inputs, opts, s.truth, None, cfg.loss, SC)
    # the parameter groups hold every parameter exactly once, the K head in the 'k' group
    groups = k.parameter_groups(model, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert {id(p) for g in groups if g["role"] == "k" for p in g["params"]} == {id(p) for p in model.k_head.parameters()}
    # estimates with a given K: exactly that K, through the one inference path
    K = torch.tensor([1, 2, 3, 5])
    with torch.no_grad():
        est = locate_from_prediction(model(inputs, opts), inputs, opts, SC, Calibration(), {"refine_iterations": 2}, K=K)
    assert torch.equal(est.K.cpu(), K)
    on = torch.arange(SC.k_max).view(1, -1) < K.view(-1, 1)
    assert torch.isfinite(est.phi[on]).all() and torch.isnan(est.phi[~on]).all()


@pytest.mark.parametrize("method", ["learned", "learned+ml", "subspacenet"])
def test_known_k_is_returned_exactly(method):
    scenes = risloc.simulate(SC, 6, seed=33)
    est = get(method)(scenes, K=2)
    assert torch.equal(est.K, torch.full((6,), 2, dtype=est.K.dtype))
    K = torch.tensor([1, 5, 3, 2, 4, 1])
    est = get(method)(scenes, K=K)
    assert torch.equal(est.K.cpu(), K.to(est.K.dtype))
    on = torch.arange(SC.k_max).view(1, -1) < K.view(-1, 1)
    assert torch.isfinite(est.phi[on]).all() and torch.isfinite(est.r[on]).all() and torch.isnan(est.phi[~on]).all()
    with pytest.raises(ValueError, match=r"K\[2\] = 7 \(scene 2\)"):
        get(method)(scenes, K=torch.tensor([1, 2, 7, 1, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        get(method)(scenes, K=torch.tensor([1, 2]))


def test_learned_with_the_true_k_does_at_least_as_well_as_with_its_own():
    """At 20 dB, told the true K, the shipped detector's K strongest detections (refined) score at
    least as well as with its K head's K-hat, on the same scenes (these 32: success 0.84 against
    0.78, K-hat right in 0.91 of them)."""
    from risloc.metrics import score

    scenes = risloc.simulate(risloc.Scenario(snr_db_min=20.0, snr_db_max=20.0), 32, seed=34)
    known = score(scenes.truth, get("learned")(scenes, K=scenes.truth.K)).overall
    free = score(scenes.truth, get("learned")(scenes)).overall
    assert known.K_acc == 1.0 and known.K_under == 0.0 and known.K_over == 0.0
    assert known.success >= free.success


def test_packaged_weights_reproduce_their_reference():
    """Estimates of the packaged models on 32 fixed scenes equal the stored reference
    (tests/data/learned_reference.pt, tests/data/make_learned_reference.py) on every scene whose
    answer does not move under float32 rounding: same K-hat, positions within 0.1 sqrt(CRB)
    (the range of learned and learned+ml also within one cell of their range decision, a choice on a
    grid that a rounding-level change can move to the neighbouring range)."""
    from helpers import assert_same_positions, range_decision_cell

    ref = torch.load(ROOT / "tests" / "data" / "learned_reference.pt", weights_only=True)
    scenes = risloc.simulate(risloc.Scenario(), 32, seed=7)
    for method, r in ref.items():
        keep = r["stable"]
        assert int(keep.sum()) >= 24, method  # most answers are stable
        est = get(method)(scenes)
        stored = risloc.Estimates(r["K"], r["phi"], r["theta"], r["r"])
        cell = 0.0 if method == "subspacenet" else range_decision_cell(scenes.scenario)  # learned's range: ml's decision
        assert_same_positions(est[keep], stored[keep], scenes[keep], 0.1, range_cell=cell)


def test_a_bare_checkpoint_name_is_a_packaged_model():
    from risloc.nn.inference import DEFAULT_WEIGHTS, packaged_or_given

    assert packaged_or_given("learned", None, DEFAULT_WEIGHTS, "") == DEFAULT_WEIGHTS
    assert packaged_or_given("learned", "mixed", DEFAULT_WEIGHTS, "") == DEFAULT_WEIGHTS
    assert packaged_or_given("learned", "default", DEFAULT_WEIGHTS, "") == DEFAULT_WEIGHTS.with_name("default.pt")
    assert packaged_or_given("learned", "runs/a/weights.pt", DEFAULT_WEIGHTS, "") == "runs/a/weights.pt"
    with pytest.raises(ValueError, match="neither a file nor a packaged model.*'default'"):
        packaged_or_given("learned", "no_such_model", DEFAULT_WEIGHTS, "")


def test_load_model_takes_a_packaged_models_name():
    from risloc.nn.checkpoint import file_sha256
    from risloc.nn.inference import BASE_WEIGHTS, load_model

    assert load_model("default").sha256 == file_sha256(BASE_WEIGHTS)
    with pytest.raises(ValueError, match="checkpoint 'no_such_model' is neither a file nor a packaged model"):
        load_model("no_such_model")
