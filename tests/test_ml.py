"""Tests of the ``ml`` estimator (risloc.estimators.ml) and its likelihood core."""

from __future__ import annotations

import cmath
import inspect
import dataclasses
import math

import pytest
import torch

import risloc
from risloc import Estimates, Scenario, simulate
from risloc.scenes import Scenes
from risloc.estimators import get
from helpers import NoHostReads as _NoHostReads, assert_same_positions, range_decision_cell
from risloc.estimators.ml_core import stochastic_eval, static_eval
from risloc.grids import maps

DEG = math.pi / 180


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hits(truth, est, s):
    """Per-scene success (K-hat = K and every source a hit), with a greedy nearest matching."""
    K = int(truth.K[s])
    if int(est.K[s]) != K:
        return False
    used = set()
    for k in range(K):
        best, bj = None, None
        for j in range(K):
            if j in used:
                continue
            dp = abs(float(truth.phi[s, k] - est.phi[s, j]))
            dt = abs(float(truth.theta[s, k] - est.theta[s, j]))
            dr = abs(float(truth.r[s, k] - est.r[s, j])) / float(truth.r[s, k])
            cost = (dp / (2 * DEG)) ** 2 + (dt / (2 * DEG)) ** 2 + (dr / 0.1) ** 2
            if best is None or cost < best:
                best, bj, ok = cost, j, dp <= 2 * DEG and dt <= 2 * DEG and dr <= 0.1
        used.add(bj)
        if not ok:
            return False
    return True


def _check_output(est: Estimates, n: int, k_max: int):
    assert est.K.shape == (n,) and est.phi.shape == (n, k_max)
    assert est.phi.dtype == torch.float32 and est.r.dtype == torch.float32
    for s in range(n):
        k = int(est.K[s])
        assert 0 <= k <= k_max
        for t in (est.phi, est.theta, est.r):
            assert torch.isfinite(t[s, :k]).all()
            assert torch.isnan(t[s, k:]).all()


def test_registered():
    from risloc.estimators import ml

    assert inspect.unwrap(get("ml")) is ml.estimate  # the registry wraps it (chunks, K, empty batches)


def test_likelihood_gradients_match_autograd():
    sc = Scenario(k_fixed=3, snr_db_min=10, snr_db_max=10)
    s = simulate(sc, 3, seed=1)
    y, H, c = (t.to(torch.complex128) for t in (s.y, s.H, s.codes))
    t = s.truth
    act = torch.isfinite(t.phi)
    act[0, 1] = False  # a masked slot
    x = [torch.nan_to_num(v.double(), 0.3) for v in (t.phi, t.theta, 1 / t.r, t.power.log())]
    ls = t.noise_var.double().log()
    params = torch.cat(x + [ls[:, None]], 1)
    K = 5
    split = lambda p: (p[:, :K], p[:, K:2 * K], p[:, 2 * K:3 * K], p[:, 3 * K:4 * K], p[:, 4 * K])
    nll, grad, F = stochastic_eval(*split(params), act, y, H, c, sc)
    p = params.clone().requires_grad_(True)
    ref = torch.autograd.grad(stochastic_eval(*split(p), act, y, H, c, sc, derivatives=False)[0].sum(), p)[0]
    assert torch.allclose(grad, ref, atol=1e-8 * ref.abs().max())
    assert torch.allclose(F, F.mT) and (torch.linalg.eigvalsh(F) > 0).all()
    # static: variable-projection gradient
    pos = params[:, :3 * K].clone().requires_grad_(True)
    n0 = static_eval(pos[:, :K], pos[:, K:2 * K], pos[:, 2 * K:], act, y, H, c, sc, derivatives=False)[0]
    ref = torch.autograd.grad(n0.sum(), pos)[0]
    _, g, _, _ = static_eval(params[:, :K], params[:, K:2 * K], params[:, 2 * K:3 * K], act, y, H, c, sc, ridge=0.0)
    assert torch.allclose(g, ref, rtol=1e-6, atol=1e-6 * ref.abs().max())


def test_steering_vector_parts_are_the_steering_vectors_and_their_derivatives():
    """The real-arithmetic steering of the compiled likelihood against the complex one (float64)."""
    from risloc import physics
    from risloc.estimators.ml_core import steering_vector_parts

    sc = Scenario()
    g = torch.Generator().manual_seed(3)
    phi, theta = (torch.rand(4, 3, generator=g, dtype=torch.float64) - 0.5, (torch.rand(4, 3, generator=g, dtype=torch.float64) - 0.5) / 2)
    rho = 0.1 + 1.9 * torch.rand(4, 3, generator=g, dtype=torch.float64)
    e, e2 = physics.element_geometry(sc, torch.float64, "cpu")
    Xr, Xi = steering_vector_parts(phi, theta, rho, e, e2, 2 * math.pi / sc.wavelength)
    ref = torch.cat(physics.steering_with_derivatives(phi, theta, rho, sc, range_param="rho", dtype=torch.complex128), dim=1)
    assert Xr.shape == (4, 12, sc.n_h * sc.n_v)
    assert torch.allclose(torch.complex(Xr, Xi), ref, rtol=1e-12, atol=1e-12 * ref.abs().max())


def test_hermitian_inverse_parts_is_the_inverse_and_log_determinant():
    """The compiled likelihood's Gauss-Jordan inverse against torch.linalg in float64, on Hermitian
    positive-definite matrices with condition numbers 1 to 1e8 (the likelihood's C at high SNR); a
    matrix with a negative eigenvalue is reported as failed."""
    from risloc.estimators.ml_core import hermitian_inverse_parts

    g = torch.Generator().manual_seed(4)
    M = 16
    Q = torch.linalg.qr(torch.randn(6, M, M, dtype=torch.complex128, generator=g))[0]
    eig = torch.stack([torch.logspace(0, -e, M, dtype=torch.float64) for e in (0, 1, 2, 4, 6, 8)])
    C = (Q * eig.unsqueeze(1).to(Q.dtype)) @ Q.mH
    C = 0.5 * (C + C.mH)
    Qr, Qi, logdet, failed = hermitian_inverse_parts(C.real, C.imag)
    ref = torch.linalg.inv(C)
    kappa = eig[:, 0] / eig[:, -1]
    err = (torch.complex(Qr, Qi) - ref).abs().amax((-2, -1)) / ref.abs().amax((-2, -1))
    assert (err < 1e-14 * kappa).all(), err
    assert torch.allclose(logdet, torch.linalg.slogdet(C)[1], rtol=0, atol=1e-9)
    assert not failed.any()
    eig[2, 5] = -1e-3  # indefinite
    C = (Q * eig.unsqueeze(1).to(Q.dtype)) @ Q.mH
    assert hermitian_inverse_parts(C.real, C.imag)[3].tolist() == [False, False, True, False, False, False]


def _likelihood_inputs(seed: int, snr_db: float, masked: tuple[int, int], shift: float = 0.0, signal: str = "stochastic"):
    """Two scenes of three sources in float64 for the likelihood comparisons: (scenario, scenes,
    y, H, codes, the active slots with slot ``masked`` off, [phi, theta, rho, log p] at the truth
    (+ ``shift``), log sigma^2)."""
    sc = Scenario(k_fixed=3, snr_db_min=snr_db, snr_db_max=snr_db, signal=signal)
    s = simulate(sc, 2, seed=seed)
    y, H, c = (t.to(torch.complex128) for t in (s.y, s.H, s.codes))
    t = s.truth
    act = torch.isfinite(t.phi)
    act[masked] = False
    x = [torch.nan_to_num(v.double(), 0.3) + shift for v in (t.phi, t.theta, 1 / t.r, t.power.log())]
    return sc, s, y, H, c, act, x, t.noise_var.double().log()


def test_real_arithmetic_likelihood_equals_the_complex_one():
    """``ml_core.stochastic_eval_parts`` (the compiled likelihood's form, run here without
    compilation) against ``stochastic_eval`` in float64: NLL, gradient and Fisher matrix with and
    without derivatives, without and with the stacked maps, with no, white and coloured floors,
    with a source masked out."""
    from risloc import physics
    from risloc.estimators.ml_core import stochastic_eval_parts

    sc, _, y, H, c, act, x, ls = _likelihood_inputs(2, 15, (1, 2), 0.01)
    M = y.shape[-1]
    A = torch.randn(2, sc.snapshots, M, M, dtype=torch.complex128, generator=torch.Generator().manual_seed(6))
    floors = (None, torch.full((2, sc.snapshots), 0.02, dtype=torch.float64), 0.01 * (A @ A.mH) / M)
    e, e2 = physics.element_geometry(sc, torch.float64, "cpu")
    r = torch.view_as_real
    for f in floors:
        fv = None if f is None else (r(f) if f.is_complex() else f)
        for derivatives in (True, False):
            ref = stochastic_eval(*x, ls, act, y, H, c, sc, floor=f, derivatives=derivatives)
            for G in (None, maps(H, c)):
                out = stochastic_eval_parts(*x, ls, act, r(y), r(H), r(c), None if G is None else r(G), e, e2,
                                            2 * math.pi / sc.wavelength, fv, derivatives)
                for a, b in zip(ref, out):
                    assert (a is None) == (b is None)
                    assert a is None or torch.allclose(a, b, rtol=1e-10, atol=1e-10 * a.abs().max())


def test_real_arithmetic_static_likelihood_equals_the_complex_one():
    """``ml_core.static_eval_parts`` (the compiled static likelihood's form, run here without
    compilation) against ``static_eval`` in float64: NLL, gradient, normal matrix and amplitudes,
    with and without derivatives and the stacked maps, with a source masked out."""
    from risloc import physics
    from risloc.estimators.ml_core import static_eval_parts

    sc, _, y, H, c, act, x, _ = _likelihood_inputs(2, 15, (1, 2), 0.01, signal="static")
    x = x[:3]
    e, e2 = physics.element_geometry(sc, torch.float64, "cpu")
    r = torch.view_as_real
    for derivatives in (True, False):
        ref = static_eval(*x, act, y, H, c, sc, derivatives=derivatives)
        for G in (None, maps(H, c)):
            nll, grad, F, gr, gi = static_eval_parts(*x, act, r(y), r(H), r(c), None if G is None else r(G), e, e2,
                                                     2 * math.pi / sc.wavelength, 1e-6, derivatives)
            for a, b in zip(ref, (nll, grad, F, torch.complex(gr, gi))):
                assert (a is None) == (b is None)
                assert a is None or torch.allclose(a, b, rtol=1e-10, atol=1e-10 * a.abs().max())


def _cxx_compiler() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _cxx_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_likelihood_equals_the_eager_one():
    """``compiled=True`` (ml's ``compile`` option): the same NLL, gradient and Fisher matrix as the
    eager evaluation in float64, masked slots and white and coloured floors included, and the same
    static likelihood; and ``ml``'s ``init`` path with ``compile=True`` gives the same answers in
    float32 to well inside the hit window, for stochastic and static scenes."""
    sc, s, y, H, c, act, x, ls = _likelihood_inputs(1, 10, (0, 1))
    t = s.truth
    floor = torch.full((2, sc.snapshots), 0.01, dtype=torch.float64)
    M = y.shape[-1]
    A = torch.randn(2, sc.snapshots, M, M, dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
    coloured = 0.01 * (A @ A.mH) / M  # a Hermitian positive semi-definite floor per snapshot
    for f, derivatives, G in ((None, True, None), (floor, False, maps(H, c)), (coloured, True, maps(H, c))):
        eager = stochastic_eval(*x, ls, act, y, H, c, sc, floor=f, derivatives=derivatives)
        fused = stochastic_eval(*x, ls, act, y, H, c, sc, floor=f, derivatives=derivatives, G=G, compiled=True)
        for a, b in zip(eager, fused):
            assert (a is None) == (b is None)
            assert a is None or torch.allclose(a, b, rtol=1e-9, atol=1e-9 * a.abs().max())
    plain = get("ml")(s, init=t, final_iterations=4)
    fused = get("ml")(s, init=t, final_iterations=4, compile=True)
    assert_same_positions(plain, fused, s, 0.1, range_cell=range_decision_cell(sc))
    # the static likelihood, compiled likewise
    x = x[:3]
    eager = static_eval(*x, act, y, H, c, sc)
    fused = static_eval(*x, act, y, H, c, sc, compiled=True)
    for a, b in zip(eager, fused):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * a.abs().max())
    st = simulate(dataclasses.replace(sc, signal="static"), 2, seed=1)
    plain = get("ml")(st, init=st.truth, final_iterations=4)
    fused = get("ml")(st, init=st.truth, final_iterations=4, compile=True)
    assert_same_positions(plain, fused, st, 0.1, range_cell=range_decision_cell(sc))


@pytest.mark.skipif(not _cxx_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_fisher_scoring_step_equals_the_eager_one():
    """The compile option's Fisher-scoring bookkeeping (ml._lm_propose, ml._lm_accept through
    torch.compile) gives the eager step, trial point and decisions in float64: kept and refused
    trials, a Fisher matrix the solve cannot use (NaN: no step) and a non-finite trial NLL included."""
    from risloc.estimators import ml as ml_module
    from risloc.estimators.ml_core import compile_step

    g = torch.Generator().manual_seed(8)
    B, P = 6, 9
    A = torch.randn(B, P, P, generator=g, dtype=torch.float64)
    F = A @ A.mT + 0.1 * torch.eye(P, dtype=torch.float64)
    F[2, 0, 0] = float("nan")  # no usable step
    grad = torch.randn(B, P, generator=g, dtype=torch.float64)
    x = torch.randn(B, P, generator=g, dtype=torch.float64)
    lam = torch.tensor([1e-2, 1e-7, 1.0, 1e3, 1e7, 0.3], dtype=torch.float64)
    lo, hi = torch.full((P,), -0.5, dtype=torch.float64), torch.full((P,), 0.5, dtype=torch.float64)
    xt = ml_module._lm_propose(F, grad, x, lam, lo, hi)
    assert torch.allclose(compile_step(ml_module._lm_propose)(F, grad, x, lam, lo, hi), xt, rtol=1e-12, atol=1e-12)
    assert torch.equal(xt[2], x[2].clamp(-0.5, 0.5))  # that scene takes no step
    nll = torch.randn(B, generator=g, dtype=torch.float64)
    nll_t = nll + torch.tensor([-1.0, 1.0, -0.5, float("nan"), -2.0, float("inf")], dtype=torch.float64)
    trial = (xt, nll_t, torch.randn(B, P, generator=g, dtype=torch.float64), F.flip(0))
    eager = ml_module._lm_accept(*trial, x, nll, grad, F, lam)
    fused = compile_step(ml_module._lm_accept)(*trial, x, nll, grad, F, lam)
    assert eager[0].tolist() == [True, False, True, False, True, False]
    for a, b in zip(eager, fused):
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, rtol=1e-12, atol=1e-300, equal_nan=True)


def test_a_failed_compilation_says_what_the_compile_option_needs(monkeypatch):
    """A compilation failure (torch._dynamo's exceptions, as inductor raises without a working C++
    compiler) is reported with what the option needs; any other error of the call passes unchanged."""
    from torch._dynamo.exc import TorchDynamoException

    from risloc.estimators import ml_core

    class CompileFailed(TorchDynamoException):
        pass

    def broken(error):
        def compile(fn, **kw):
            def run(*a):
                raise error
            return run
        return compile

    sc = Scenario(k_fixed=1)
    s = simulate(sc, 1, seed=2)
    t = s.truth
    x = [torch.nan_to_num(v, 0.3) for v in (t.phi, t.theta, 1 / t.r, t.power.log())]
    monkeypatch.setattr(ml_core, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken(CompileFailed("InvalidCxxCompiler: No working C++ compiler found")))
    with pytest.raises(RuntimeError, match="compile=True.*No working C\\+\\+ compiler found.*without the compile option"):
        stochastic_eval(*x, t.noise_var.log(), torch.isfinite(t.phi), s.y, s.H, s.codes, sc, compiled=True)
    monkeypatch.setattr(ml_core, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken(RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="^CUDA out of memory$"):
        stochastic_eval(*x, t.noise_var.log(), torch.isfinite(t.phi), s.y, s.H, s.codes, sc, compiled=True)


@pytest.mark.parametrize("signal", ["stochastic", "static"])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_high_snr_finds_sources(signal, K):
    sc = Scenario(k_fixed=K, snr_db_min=30, snr_db_max=30, signal=signal)
    s = simulate(sc, 4, seed=100 + K)
    est = get("ml")(s)
    _check_output(est, 4, sc.k_max)
    ok = [_hits(s.truth, est, i) for i in range(4)]
    assert all(ok), f"{signal} K={K}: scene successes {ok}, K-hat {est.K.tolist()}"


def test_scale_invariance():
    """A complex gain on y changes nothing that matters: the same K-hat, and positions that
    agree within a tenth of sqrt(CRB) (float32 rounding differs between CPUs: max 0.011 sqrt(CRB)
    over the original and 5 re-rounded draws of y, tests/rounding.py; a gain-dependent decision
    moves an estimate by far more than the bound)."""
    sc = Scenario(k_fixed=2, snr_db_min=15, snr_db_max=15)
    s = simulate(sc, 4, seed=3)
    a = get("ml")(s)
    s2 = risloc.Scenes(s.y * (7e3 * cmath.exp(0.3j)), s.H, s.codes, s.scenario)
    b = get("ml")(s2)
    assert_same_positions(a, b, s, 0.1)


def test_init_refines_perturbed_truth():
    sc = Scenario(k_fixed=3, snr_db_min=30, snr_db_max=30)
    s = simulate(sc, 6, seed=7)
    t = s.truth
    g = torch.Generator().manual_seed(1)
    sign = lambda: torch.randint(0, 2, t.phi.shape, generator=g) * 2 - 1
    init = Estimates(
        t.K.clone(),
        t.phi + sign() * 1.5 * DEG,
        t.theta + sign() * 1.5 * DEG,
        t.r * (1 + 0.08 * sign()),
    )
    est = get("ml")(s, init=init)
    _check_output(est, 6, sc.k_max)
    assert torch.equal(est.K, t.K)
    assert all(_hits(t, est, i) for i in range(6))
    # the refinement moved the perturbed positions much closer
    err0 = (init.phi - t.phi).abs().nanmean()
    err1 = (est.phi - t.phi).abs().nanmean()
    assert err1 < 0.2 * err0


def test_init_prune_drops_a_spurious_source_and_keeps_true_ones():
    sc = Scenario(k_fixed=2, snr_db_min=25, snr_db_max=25)
    s = simulate(sc, 6, seed=8)
    t = s.truth
    nan = torch.full((6, sc.k_max - 3), math.nan)
    # the truth plus a third, spurious source far from both (phi = -50 deg or +50 deg, theta = 25 deg, 3 m)
    far = torch.where(t.phi[:, :1] > 0, -50.0, 50.0) * DEG
    init = Estimates(t.K + 1, torch.cat([t.phi[:, :2], far, nan], 1), torch.cat([t.theta[:, :2], torch.full((6, 1), 25 * DEG), nan], 1),
                     torch.cat([t.r[:, :2], torch.full((6, 1), 3.0), nan], 1))
    pruned = get("ml")(s, init=init, init_prune=1)
    assert torch.equal(pruned.K, t.K)
    assert all(_hits(t, pruned, i) for i in range(6))
    kept = get("ml")(s, init=init)  # init_prune = 0: K-hat is the init's
    assert torch.equal(kept.K, t.K + 1)
    truth_init = Estimates(t.K.clone(), t.phi.clone(), t.theta.clone(), t.r.clone())
    assert torch.equal(get("ml")(s, init=truth_init, init_prune=2).K, t.K)  # true sources are never pruned here


def test_init_path_answers_noise_alone_with_no_source():
    # three proposed sources on noise alone: the pruning passes stop at one source, the order rule
    # against the empty model then removes it; without pruning the proposed count is kept
    sc = Scenario(k_fixed=1, snr_db_min=20, snr_db_max=20)
    s = simulate(sc, 3, seed=12)
    g = torch.Generator().manual_seed(12)
    noise = torch.complex(torch.randn(s.y.shape, generator=g), torch.randn(s.y.shape, generator=g))
    alone = Scenes(noise.to(s.y.dtype), s.H, s.codes, sc, s.snr_db, None)
    nan = torch.full((3, sc.k_max - 3), math.nan)
    spread = torch.tensor([-30.0, 0.0, 30.0]) * DEG
    init = Estimates(torch.full((3,), 3), torch.cat([spread.expand(3, 3), nan], 1), torch.cat([torch.zeros(3, 3), nan], 1),
                     torch.cat([torch.full((3, 3), 2.0), nan], 1))
    assert torch.equal(get("ml")(alone, init=init, init_prune=2).K, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(get("ml")(alone, init=init).K, torch.full((3,), 3))
    # one true source at 20 dB started at its position: the empty model is not preferred
    t = s.truth
    truth_init = Estimates(t.K.clone(), t.phi.clone(), t.theta.clone(), t.r.clone())
    assert torch.equal(get("ml")(s, init=truth_init, init_prune=2).K, t.K)


def _three_sources_and_the_first_two(n: int):
    """``n`` scenes with three sources at 25 dB (seed 9) and the truth without its third source."""
    sc = Scenario(k_fixed=3, snr_db_min=25, snr_db_max=25)
    s = simulate(sc, n, seed=9)
    t = s.truth
    nan = torch.full((n, sc.k_max - 2), math.nan)
    init = Estimates(t.K - 1, torch.cat([t.phi[:, :2], nan], 1), torch.cat([t.theta[:, :2], nan], 1), torch.cat([t.r[:, :2], nan], 1))
    return sc, s, t, init


def test_init_grow_adds_a_missed_source_and_only_when_the_likelihood_wants_it():
    # the truth without its third source: one growth step must find it again
    sc, s, t, init = _three_sources_and_the_first_two(6)
    grown = get("ml")(s, init=init, init_grow=1)
    assert torch.equal(grown.K, t.K)
    assert all(_hits(t, grown, i) for i in range(6))
    assert torch.equal(get("ml")(s, init=init).K, t.K - 1)  # init_grow = 0: K-hat is the init's
    # from the full truth no further source is worth its penalty
    full = Estimates(t.K.clone(), t.phi.clone(), t.theta.clone(), t.r.clone())
    assert torch.equal(get("ml")(s, init=full, init_grow=2).K, t.K)


def test_relax_moves_a_misplaced_weak_source_and_searches_each_source_once(monkeypatch):
    from risloc.estimators import ml as ml_mod

    sc = Scenario(k_fixed=3, snr_db_min=25, snr_db_max=25)
    s = simulate(sc, 6, seed=10)
    t = s.truth
    nan = torch.full((6, sc.k_max - 3), math.nan)
    # the truth with its third source moved far away (phi = -50 or +50 deg, theta = 25 deg, 3 m), in slot 0
    far = torch.where(t.phi[:, 2:3] > 0, -50.0, 50.0) * DEG
    init = Estimates(t.K.clone(), torch.cat([far, t.phi[:, :2], nan], 1), torch.cat([torch.full((6, 1), 25 * DEG), t.theta[:, :2], nan], 1),
                     torch.cat([torch.full((6, 1), 3.0), t.r[:, :2], nan], 1))
    stuck = get("ml")(s, init=init)
    assert not any(_hits(t, stuck, i) for i in range(6))  # the refinement alone cannot move it there
    removed = []
    spy = ml_mod._remove
    monkeypatch.setattr(ml_mod, "_remove", lambda st, j, k: (removed.append(st.phi.gather(1, j.view(-1, 1)).squeeze(1)), spy(st, j, k))[1])
    weakest = get("ml")(s, init=init, init_relax=1, relax_sources=1)
    start = stuck.phi[:, :3]  # the refined start that RELAX sees (the same refinement), misplaced source in slot 0
    assert len(removed) == 1 and torch.allclose(removed[0], start[:, 0])  # only the misplaced (weakest) source
    assert torch.equal(weakest.K, t.K) and all(_hits(t, weakest, i) for i in range(6))
    removed.clear()
    every = get("ml")(s, init=init, init_relax=1)
    assert torch.equal(every.K, t.K) and all(_hits(t, every, i) for i in range(6))
    # one cycle removes each source of the start once: the misplaced one first, then the two true
    # ones (not the source that just replaced the misplaced one, though the slots moved); eagerly
    # the batch's largest K-hat bounds the passes (a CUDA graph runs K_max, the extra ones void)
    assert len(removed) == 3
    got = torch.stack(removed, 1)  # [6, 3] phi of the removed sources
    near = lambda a, b: (a - b).abs() < 1.5 * DEG  # after an accepted move all are refined: the others move a little
    assert torch.allclose(got[:, 0], start[:, 0])
    assert bool(near(got[:, 1:].sort(1).values, start[:, 1:].sort(1).values).all())
    assert not bool(near(t.phi[:, 2:3], start[:, 1:]).any())  # so the moved source was not searched twice


def test_degenerate_inputs():
    sc = Scenario(k_fixed=2, snr_db_min=10, snr_db_max=10)
    s = simulate(sc, 3, seed=5)
    # all-zero snapshots: nothing to find
    zero = risloc.Scenes(torch.zeros_like(s.y), s.H, s.codes, s.scenario)
    est = get("ml")(zero)
    _check_output(est, 3, sc.k_max)
    assert (est.K == 0).all()
    # pure noise: whatever is found is finite
    g = torch.Generator().manual_seed(0)
    noise = torch.complex(torch.randn(s.y.shape, generator=g), torch.randn(s.y.shape, generator=g))
    est = get("ml")(risloc.Scenes(noise, s.H, s.codes, s.scenario))
    _check_output(est, 3, sc.k_max)
    assert (est.K <= 2).all()
    # init with K-hat = 0 and k_max smaller than the scenario's
    est = get("ml")(s, init=Estimates.empty(3, sc.k_max))
    _check_output(est, 3, sc.k_max)
    assert (est.K == 0).all()
    est = get("ml")(s, k_max=1)
    _check_output(est, 3, 1)
    # bad input is refused with the field and the scene
    bad = s.y.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="y of scene 1"):
        get("ml")(risloc.Scenes(bad, s.H, s.codes, s.scenario))
    with pytest.raises(ValueError, match="model"):
        get("ml")(s, model="nope")


def test_known_K_is_returned_exactly_and_finds_the_sources():
    sc = Scenario(snr_db_min=25, snr_db_max=25)
    s = simulate(sc, 4, seed=21)
    known = s.truth.K.clone()
    est = get("ml")(s, K=known)
    _check_output(est, 4, sc.k_max)
    assert torch.equal(est.K, known)
    assert all(_hits(s.truth, est, i) for i in range(4)), est.K.tolist()
    # an int K, including 0 and orders other than the truth, is returned as given
    for k in (0, 1, sc.k_max):
        e = get("ml")(s[:2], K=k)
        assert e.K.tolist() == [k, k]
        assert torch.isfinite(e.phi[:, :k]).all() and torch.isnan(e.phi[:, k:]).all()
    mixed = torch.tensor([2, 0], dtype=torch.int64)
    assert torch.equal(get("ml")(s[:2], K=mixed).K, mixed)


def test_known_K_and_options_are_validated():
    from risloc.estimators.ml import MLOptions

    s = simulate(Scenario(), 2, seed=0)
    for bad, match in ((6, "scene 0"), (torch.tensor([1, -1]), "scene 1"), (torch.tensor([1.0, 2.0]), "dtype"),
                       (torch.tensor([1, 2, 3]), "3 values"), ("2", "int")):
        with pytest.raises(ValueError, match=match):
            get("ml")(s, K=bad)
    with pytest.raises(ValueError, match="init"):
        get("ml")(s, K=1, init=get("ml")(s, K=1))
    with pytest.raises(ValueError, match="unknown option"):
        get("ml")(s, tops=3)
    with pytest.raises(ValueError, match="range_decision"):
        MLOptions(range_decision="map")
    # options= and keyword overrides give the same estimator
    a = get("ml")(s, K=1, options=MLOptions(top=8, final_iterations=5))
    b = get("ml")(s, K=1, top=8, iterations=5)
    assert torch.equal(a.phi.nan_to_num(), b.phi.nan_to_num()) and torch.equal(a.r.nan_to_num(), b.r.nan_to_num())


def test_greedy_products_through_the_dictionary_equal_those_with_the_measured_dictionary():
    """ml's greedy steps never hold Phi_l = G_l D: v^H Phi_l (per snapshot), sum_l v_l^H Phi_l,
    |phi_lq|^2 and phi_lq^H y_l from the dictionary equal the explicit products with Phi (complex128)."""
    from risloc import grids
    from risloc.estimators import ml

    sc = Scenario()
    s = simulate(sc, 3, seed=5)
    y, H, codes = (t.to(torch.complex128) for t in (s.y, s.H, s.codes))
    prob = ml._Problem(y, H, codes, sc, False, ml._box(sc, torch.float64, "cpu"), None, ml.MLOptions(grid_shape=(5, 4, 3)))
    dico = ml._measured_dictionary(prob)
    Phi = grids.measure_dictionary(H, codes, dico.D)  # [B, L, M, Q], the explicit reference
    B, L, M, Q = Phi.shape
    assert torch.allclose(dico.n2, Phi.abs().square().sum(2), rtol=1e-12)
    assert torch.allclose(dico.c, (Phi.conj() * y.unsqueeze(-1)).sum(2), rtol=1e-10, atol=1e-12)
    V = torch.randn(B, L, 2, M, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    ref = V.conj() @ Phi  # [B, L, 2, Q]
    assert torch.allclose(dico.products(V), ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(dico.summed_products(V), ref.sum(1), rtol=1e-10, atol=1e-12)
    assert torch.allclose(dico.summed_products(y), (y.unsqueeze(2).conj() @ Phi).squeeze(2).sum(1), rtol=1e-10, atol=1e-12)


def test_empty_slots_change_nothing_in_the_stochastic_greedy_step():
    # slots 2.. empty in every scene: the int slot (the search path: they are left out) and the
    # per-scene slot (all K_max slots kept, no host read) pick the same atom with the same power
    from risloc.estimators import ml

    sc = Scenario(k_fixed=3, snr_db_min=20, snr_db_max=20)
    s = simulate(sc, 4, seed=3)
    t = s.truth
    y, H, empty = ml.unit_power(s.y.to(torch.complex128), s.H.to(torch.complex128))
    prob = ml._Problem(y, H, s.codes.to(torch.complex128), sc, False, ml._box(sc, torch.float64, "cpu"), None,
                       ml.MLOptions(grid_shape=(9, 5, 4)))
    pad = lambda v: torch.cat([v[:, :2], torch.full((4, sc.k_max - 2), math.nan)], 1)  # noqa: E731
    two = Estimates(torch.full((4,), 2), pad(t.phi), pad(t.theta), pad(t.r))
    st = ml._init_state(two, prob.box, sc.k_max, torch.float64, "cpu")
    logp, logs = ml._ls_powers(st, prob)
    st = dataclasses.replace(st, logp=logp, logs=logs)
    dico = ml._measured_dictionary(prob)
    a = ml._add_stochastic(st, 2, dico, prob, None, 8)
    b = ml._add_stochastic(st, torch.full((4,), 2), dico, prob, None, 8)
    for name in ("phi", "theta", "rho", "logp", "active"):
        assert torch.allclose(getattr(a, name).double(), getattr(b, name).double(), rtol=1e-9, atol=1e-9), name


def test_the_graphed_stages_read_no_device_value(monkeypatch):
    # what a few scenes on CUDA replay as CUDA graphs (the init path, the search up to K-hat, the
    # finish, the refinement) must run without a single host read; checked here on the CPU
    from risloc.estimators import ml

    seen = []
    monkeypatch.setattr(ml.cuda_graphs, "graphable", lambda *args, **kwargs: True)  # the paths a few CUDA scenes take

    def strict(name, stage, prob, **args):  # ... each stage run as it is, refusing host reads
        seen.append(name)
        with _NoHostReads():
            return stage(prob=prob, **args)

    monkeypatch.setattr(ml, "_graphed", strict)
    for signal in ("stochastic", "static"):
        sc = Scenario(k_fixed=2, snr_db_min=20, snr_db_max=20, signal=signal)
        s = simulate(sc, 2, seed=5)
        opts = dict(grid_shape=(9, 5, 4), greedy_iterations=2, final_iterations=2)
        full = get("ml")(s, **opts)
        t = s.truth
        init = Estimates(t.K.clone(), t.phi.clone(), t.theta.clone(), t.r.clone())
        grown = get("ml")(s, init=init, init_grow=1, init_relax=1, init_prune=2, **opts)
        assert len(full) == len(grown) == 2
    assert {"ml._init_path", "ml._search", "ml._finish", "ml._refine"} <= set(seen)
    with pytest.raises(AssertionError, match="host read"):  # the guard itself works
        with _NoHostReads():
            bool(torch.ones(1) > 0)


def test_solve_and_inverse_without_synchronisation_match_linalg_and_flag_singular_systems():
    from risloc.estimators.ml_core import inverse, solve

    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, 3, dtype=torch.complex128, generator=g) + 3 * torch.eye(3, dtype=torch.complex128)
    B = torch.randn(4, 3, 2, dtype=torch.complex128, generator=g)
    assert torch.allclose(solve(A, B), torch.linalg.solve(A, B))
    assert torch.allclose(inverse(A), torch.linalg.inv(A))
    A[1] = 0  # singular: NaN for that system only, no exception
    X, Ai = solve(A, B), inverse(A)
    assert bool(torch.isnan(X[1]).all()) and bool(torch.isnan(Ai[1]).all())
    assert bool(torch.isfinite(X[[0, 2, 3]]).all()) and torch.allclose(Ai[0], torch.linalg.inv(A[0]))


@pytest.mark.parametrize("triangular_solve", [False, True])
def test_cholesky_inverse_both_routes_invert_the_matrix(triangular_solve):
    from risloc.estimators.ml_core import cholesky_inverse, hermitian_solve_parts

    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 5, 6, 6, dtype=torch.complex128, generator=g)
    C = A @ A.mH + 0.1 * torch.eye(6, dtype=torch.complex128)
    Lc = torch.linalg.cholesky(C)
    Ci = cholesky_inverse(Lc, triangular_solve=triangular_solve)
    assert torch.allclose(Ci, torch.linalg.inv(C), rtol=1e-9, atol=1e-9)
    Ci2, logdet, info = hermitian_solve_parts(C)
    assert torch.allclose(Ci2, Ci, rtol=1e-9, atol=1e-9) and bool((info == 0).all())
    assert torch.allclose(logdet, torch.linalg.slogdet(C).logabsdet, rtol=1e-12, atol=1e-9)


def test_per_scene_atoms_search_like_the_dictionary_they_copy():
    from risloc import grids

    sc, s, t, init = _three_sources_and_the_first_two(4)
    shape = (9, 5, 4)
    g = grids.dictionary(sc, shape, dtype=torch.complex64)
    rep = lambda x: x.to(torch.float32).unsqueeze(0).expand(4, -1).clone()
    atoms = Estimates(torch.full((4,), g.phi.numel()), rep(g.phi), rep(g.theta), rep(1.0 / g.rho))
    opts = dict(grid_shape=shape, init_grow=1, init_relax=1, iterations=4, greedy_iterations=4)
    on_grid = get("ml")(s, init=init, **opts)
    on_atoms = get("ml")(s, init=init, atoms=atoms, **opts)
    # the same search on atoms rebuilt from float32 positions: the same answer up to rounding, within a
    # tenth of sqrt(CRB) (max 0.052 sqrt(CRB) over the original and 5 re-rounded draws of y, tests/rounding.py)
    assert_same_positions(on_grid, on_atoms, s, 0.1)
    # a few atoms at the missed source: the growth search finds it from them alone
    near = Estimates(torch.full((4,), 2), torch.stack([t.phi[:, 2], t.phi[:, 2] + 20 * DEG], 1),
                     torch.stack([t.theta[:, 2], t.theta[:, 2]], 1), torch.stack([t.r[:, 2], t.r[:, 2]], 1))
    grown = get("ml")(s, init=init, atoms=near, init_grow=1)
    assert torch.equal(grown.K, t.K) and all(_hits(t, grown, i) for i in range(4))
    with pytest.raises(ValueError, match="atoms"):
        get("ml")(s, atoms=near)
    bad = Estimates(near.K, near.phi.clone(), near.theta, near.r)
    bad.phi[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"atoms.phi of scene 2"):
        get("ml")(s, init=init, atoms=bad, init_grow=1)


def test_a_measured_dictionary_searches_like_the_grid_it_was_measured_on():
    from risloc import grids
    from risloc.estimators import ml

    sc, s, t, init = _three_sources_and_the_first_two(4)
    # the record is of the scenes as given: other gains on y and H than ml's unit-power frame
    s = dataclasses.replace(s, y=s.y * 3.0, H=s.H * 0.25)
    shape = (12, 6, 6)
    D = grids.dictionary(sc, shape, dtype=torch.complex64).D
    Phi = grids.measure_dictionary(s.H, s.codes, D)  # [B, L, M, Q]
    given = grids.MeasuredDictionary(shape, Phi.abs().square().sum(2), (s.y.conj().unsqueeze(-1) * Phi).sum(2))
    opts = dict(init_grow=1, init_relax=1, iterations=4, greedy_iterations=4)
    on_grid = ml.estimate(s, init=init, grid_shape=shape, **opts)
    read = ml.estimate(s, init=init, dictionary=given, **opts)  # its grid is the record's, whatever grid_shape says
    assert torch.equal(on_grid.K, t.K) and torch.equal(read.K, on_grid.K)
    assert all(_hits(t, read, i) for i in range(4))
    assert_same_positions(on_grid, read, s, 0.1)
    with pytest.raises(ValueError, match="needs init"):
        ml.estimate(s, dictionary=given)
    short = grids.MeasuredDictionary(shape, given.norms[..., :-1], given.y_products)
    with pytest.raises(ValueError, match=r"dictionary.norms has shape \[4, 16, 431\]"):
        ml.estimate(s, init=init, dictionary=short, **opts)
    with pytest.raises(ValueError, match="dictionary.y_products"):
        ml.estimate(s, init=init, dictionary=grids.MeasuredDictionary(shape, given.norms, given.norms), **opts)
    practical = dataclasses.replace(s, scenario=dataclasses.replace(sc, ris_amplitude="practical"))
    with pytest.raises(ValueError, match="amplitude='scenario' changes them"):  # other codes than the record's
        ml.estimate(practical, init=init, dictionary=given, amplitude="scenario", **opts)
