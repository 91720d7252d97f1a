"""Small CUDA batches as replayed CUDA graphs (risloc.cuda_graphs): the tree helpers on
any device; on CUDA, the graphed answers against the eager ones, one capture per batch signature,
and a second scene through the same graph getting its own answer."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

import risloc
from risloc import cuda_graphs as graphs
from risloc import estimators
from risloc.nn.inputs import prepare_inputs
from helpers import NoHostReads


def _inputs(n: int, seed: int = 1):
    s = risloc.simulate(risloc.Scenario(), n, seed=seed)
    return prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=1e-3)


def test_tree_helpers_walk_the_dataclasses_of_the_inputs():
    x = _inputs(2)
    leaves = graphs.tree_tensors(x)
    assert len(leaves) == 7  # sample factor and diagonal, SNR, known flags, y, H, codes
    copy = graphs.tree_map(torch.clone, x)
    assert type(copy) is type(x) and type(copy.sample) is type(x.sample)
    for a, b in zip(graphs.tree_tensors(copy), leaves):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert graphs.signature(x) == graphs.signature(copy)
    assert graphs.signature(x) != graphs.signature(_inputs(3))  # another batch size
    no_y = graphs.tree_map(lambda t: t, x)
    no_y.y = None
    assert graphs.signature(no_y) != graphs.signature(x)  # a missing field is another signature
    # the scenes' scenario is kept whole (no tensors in it) and is part of the signature: a graph
    # bakes in the grid and steering of its geometry
    sc = risloc.Scenario()
    with_sc = dataclasses.replace(x, scenario=sc)
    assert graphs.tree_map(torch.clone, with_sc).scenario is sc and len(graphs.tree_tensors(with_sc)) == 7
    assert graphs.signature(with_sc) != graphs.signature(x)
    assert graphs.signature(with_sc) == graphs.signature(dataclasses.replace(x, scenario=risloc.Scenario()))
    assert graphs.signature(with_sc) != graphs.signature(dataclasses.replace(x, scenario=risloc.Scenario(snr_db_min=0.0)))


def test_not_graphed_on_the_cpu_or_for_large_batches():
    model = torch.nn.Linear(2, 2).eval()
    cuda = torch.device("cuda")
    with torch.no_grad():
        assert not graphs.graphable(1, torch.device("cpu"), model)
        assert not graphs.graphable(graphs.GRAPH_MAX_SCENES + 1, cuda, model)
        assert graphs.graphable(1, cuda, model) and graphs.graphable(1, cuda)
        assert not graphs.graphable(1, cuda, model.train())  # a model in training mode
        from risloc.nn.networks.covariance import RisCovarianceNet
        from risloc.nn.networks.subspacenet import SubspaceNet

        for cls in (SubspaceNet, RisCovarianceNet):  # their forward passes wait for the device (eigh)
            assert not cls.capturable
            frozen = torch.nn.Linear(2, 2).eval()
            frozen.capturable = cls.capturable
            assert not graphs.graphable(1, cuda, frozen)
    assert not graphs.graphable(1, cuda)  # autograd on


@pytest.mark.parametrize("method, options", [("learned", {}), ("learned+ml", {}), ("learned", {"K": 2}),
                                             ("learned", {"use_snr": False})])
def test_the_learned_graph_reads_no_device_value(method, options, monkeypatch):
    """What a few CUDA scenes of ``learned`` and ``learned+ml`` capture as ONE graph (the network,
    its K head and start, ``ml``'s init path) runs without a host read and without a copy from
    the host, checked on the CPU: every graphed call runs as it is under the guard, after a first
    call has filled the caches (a capture's warm-up does the same)."""
    from risloc.estimators import ml
    from risloc.nn import inference

    scenes = risloc.simulate(risloc.Scenario(), 2, seed=4)
    want = risloc.locate(scenes, method, **options)  # eagerly, as on the CPU; fills the caches
    seen = []

    def strict(call, inputs, key, owner=None):  # a capture's rules, on the CPU
        seen.append(key[0])
        with NoHostReads(copies=True):
            return call(inputs)

    rule = graphs.graphable  # its own rule (batch size, autograd off, the model), as if on CUDA
    as_cuda = lambda batch, device, model=None: rule(batch, torch.device("cuda"), model)  # noqa: E731
    for module in (graphs, inference):
        monkeypatch.setattr(module, "graphed", strict)
        monkeypatch.setattr(module, "graphable", as_cuda)
    monkeypatch.setattr(estimators, "uses_inference_mode", lambda device: False)  # as on CUDA
    got = risloc.locate(scenes, method, **options)
    assert seen[0] == "learned" and {"forward", "ml._init_path"} <= set(seen[1:])  # nested: inside the one graph
    # the same answers; the graphed init path runs its passes over all K_max slots (eagerly: up to
    # the largest K-hat), so the positions may differ in rounding, as on CUDA
    assert torch.equal(got.K, want.K) and got.method == want.method
    for q in ("phi", "theta"):
        assert torch.allclose(getattr(got, q).nan_to_num(9.0), getattr(want, q).nan_to_num(9.0), atol=1e-5, rtol=0), q
    assert torch.allclose(got.r.nan_to_num(9.0), want.r.nan_to_num(9.0), rtol=1e-4, atol=0)
    # the stages run one after the other, not as one graph, where a step waits for the device
    seen.clear()
    risloc.locate(scenes, "learned", checkpoint="default")  # its K head's fall-back rule: an eigen-decomposition
    risloc.locate(scenes, "learned", ml_options={"mismatch": "auto"})  # the mismatch levels are read
    risloc.locate(scenes, "learned", ml_options={"batch": 1})  # ml in batches, through the registry
    assert "learned" not in seen and "forward" in seen
    assert ml.init_path_reads(risloc.Scenario(), mismatch="auto") and not ml.init_path_reads(risloc.Scenario())
    assert ml.init_path_reads(risloc.Scenario(ris_amplitude="practical"), amplitude="scenario")
    assert not ml.init_path_reads(risloc.Scenario(ris_amplitude="practical"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_networks_that_wait_for_the_device_run_eagerly():
    scenes = risloc.simulate(risloc.Scenario(), 2, seed=4, device="cuda")
    before = set(graphs._GRAPHS)
    one = risloc.locate(scenes[0:1], "subspacenet")  # its forward takes eigenvectors: not captured
    assert len(one) == 1 and set(graphs._GRAPHS) == before
    both = risloc.locate(scenes, "subspacenet")
    assert torch.equal(both.K[:1], one.K)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method, options, captured", [
    ("learned", {}, {"learned": 1}),  # the network and the likelihood stage: one graph
    ("learned+ml", {}, {"learned": 1}),
    ("learned", {"checkpoint": "default"}, {"forward": 1, "ml._init_path": 1}),  # its K head's fall-back waits for the device
    ("learned", {"search": "network"}, {"forward": 2, "ml._init_path": 2}),  # the second look's inputs differ
    ("ml", {}, {"ml._search": 1, "ml._finish": 6}),  # the finish: one graph per bound on K-hat (0..k_max), all at the first call
])
def test_graphed_answers_as_eager(method, options, captured, monkeypatch):
    scenes = risloc.simulate(risloc.Scenario(), 3, seed=4, device="cuda")
    graphs._GRAPHS.clear()
    one, two = risloc.locate(scenes[0:1], method, **options), risloc.locate(scenes[1:2], method, **options)
    keys = [k[2][0] for k in graphs._GRAPHS]
    # the graphs captured for the first scene, replayed for the second; the refinement runs inside the stages' graphs
    assert collections.Counter(keys) == captured
    # the graphs keep what they read from the caches: clear them, reuse the freed memory, replay
    from risloc import grids

    grids._CACHE.clear(), grids._SPLIT_CACHE.clear()
    torch.cuda.empty_cache()
    junk = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(16)]
    again = risloc.locate(scenes[0:1], method, **options)
    del junk
    assert torch.equal(again.K, one.K) and torch.equal(again.phi.nan_to_num(9.0), one.phi.nan_to_num(9.0))
    monkeypatch.setattr(graphs, "GRAPH_MAX_SCENES", 0)
    for got, s in ((one, scenes[0:1]), (two, scenes[1:2])):
        want = risloc.locate(s, method, **options)
        assert torch.equal(got.K, want.K)
        for q in ("phi", "theta"):
            assert torch.allclose(getattr(got, q).nan_to_num(9.0), getattr(want, q).nan_to_num(9.0), atol=1e-5, rtol=0), q
        assert torch.allclose(got.r.nan_to_num(9.0), want.r.nan_to_num(9.0), rtol=1e-4, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_batch_magma_would_take_is_captured(monkeypatch):
    """32 scenes: torch's default sends the stage's batched solves (more than 16 matrices larger
    than 16 x 16) to MAGMA, which cannot be captured; the registry's cuSOLVER setting
    (risloc._devices.cuda_factorisations) lets the whole batch run as one graph, with eager's answers."""
    scenes = risloc.simulate(risloc.Scenario(), 32, seed=6, device="cuda")
    monkeypatch.setattr(graphs, "GRAPH_MAX_SCENES", 32)
    graphs._GRAPHS.clear()
    got = risloc.locate(scenes, "learned")
    assert [k[2][0] for k in graphs._GRAPHS] == ["learned"]
    monkeypatch.setattr(graphs, "GRAPH_MAX_SCENES", 0)
    want = risloc.locate(scenes, "learned")
    assert torch.equal(got.K, want.K)
    for q in ("phi", "theta"):
        assert torch.allclose(getattr(got, q).nan_to_num(9.0), getattr(want, q).nan_to_num(9.0), atol=1e-5, rtol=0), q
    assert torch.backends.cuda.preferred_linalg_library() == torch._C._LinalgBackend.Default  # restored
