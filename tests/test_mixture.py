"""Scenario mixtures: scene i of a mixture is scene i of its component's stream, for any request."""

import pytest
import torch

from risloc import Scenario
from risloc.data import ScenarioMixture
from risloc.nn.config import TrainConfig
from risloc.nn.train import validation_scenes
from risloc.simulate import simulate

SMALL = Scenario(n_h=4, n_v=4, m_bs=4, snapshots=4, k_max=3)


def test_components_are_the_cross_product_in_written_order():
    mix = ScenarioMixture(SMALL, "signal=stochastic,static;codebook=random,dft")
    assert mix.labels == ["signal=stochastic;codebook=random", "signal=stochastic;codebook=dft",
                          "signal=static;codebook=random", "signal=static;codebook=dft"]
    assert [(c.signal, c.codebook) for c in mix.components] == [
        ("stochastic", "random"), ("stochastic", "dft"), ("static", "random"), ("static", "dft")]
    assert len(ScenarioMixture(SMALL, "")) == 1 and ScenarioMixture(SMALL).components[0] == SMALL


def test_alternatives_set_several_fields_or_none():
    mix = ScenarioMixture(SMALL, "codebook=random,dft; - | snr_db_min=10&snr_db_max=20 | signal=static")
    assert len(mix) == 6
    assert mix.labels[:3] == ["codebook=random", "codebook=random;snr_db_min=10;snr_db_max=20", "codebook=random;signal=static"]
    assert mix.components[0] == SMALL
    assert (mix.components[1].snr_db_min, mix.components[1].snr_db_max) == (10, 20)
    assert mix.components[5].signal == "static" and mix.components[5].codebook == "dft"
    twice = ScenarioMixture(SMALL, "- | - | signal=static")
    got, ref = twice.simulate(6, seed=4), simulate(SMALL, 6, seed=4)
    assert torch.equal(got.y[[0, 1, 3, 4]], ref.y[[0, 1, 3, 4]]) and not torch.equal(got.y[2], ref.y[2])
    with pytest.raises(ValueError, match="not '-' or FIELD=VALUE"):
        ScenarioMixture(SMALL, "- | signal")


@pytest.mark.parametrize("start, n", [(0, 9), (5, 7), (1021, 6)])
def test_scene_i_is_scene_i_of_its_component(start, n):
    mix = ScenarioMixture(SMALL, "signal=stochastic,static;codebook=random,dft")
    got = mix.simulate(n, seed=11, start=start)
    assert got.scenario == SMALL and len(got) == n
    for j in range(n):
        i = start + j
        ref = simulate(mix.components[i % 4], 1, seed=11, start=i)
        assert torch.equal(got.y[j], ref.y[0]) and torch.equal(got.codes[j], ref.codes[0])
        assert torch.equal(got.truth.K[j], ref.truth.K[0]) and torch.allclose(got.truth.phi[j], ref.truth.phi[0], equal_nan=True)
    # a static-signal row is not the base (stochastic, random-code) scene of the same index
    i_static = next(j for j in range(n) if (start + j) % 4 >= 2)
    other = simulate(SMALL, 1, seed=11, start=start + i_static)
    assert not torch.equal(got.y[i_static], other.y[0])


def test_bad_mixtures_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="snapshots"):
        ScenarioMixture(SMALL, "snapshots=4,8")
    with pytest.raises(ValueError, match="not of the form"):
        ScenarioMixture(SMALL, "signal")
    with pytest.raises(ValueError, match="no value"):
        ScenarioMixture(SMALL, "signal=")
    with pytest.raises(ValueError, match="unknown Scenario field"):
        ScenarioMixture(SMALL, "colour=red")
    with pytest.raises(ValueError, match="signal"):
        ScenarioMixture(SMALL, "signal=stochastic,coherent")


def test_training_config_mix_reaches_the_validation_scenes():
    cfg = TrainConfig(val_scenes=6, mix="codebook=random,dft", scenario=SMALL)
    assert TrainConfig.from_toml(cfg.to_toml()).mix == "codebook=random,dft"
    val = validation_scenes(cfg)
    dft = simulate(SMALL.replace(codebook="dft"), 6, seed=cfg.val_seed)
    rnd = simulate(SMALL, 6, seed=cfg.val_seed)
    assert torch.equal(val.codes[1::2], dft.codes[1::2]) and torch.equal(val.codes[0::2], rnd.codes[0::2])


def test_ideal_and_impaired_components_mix_with_the_true_channel_and_codes():
    mix = ScenarioMixture(SMALL, "- | csi_nmse_db=-10 | ris_phase_noise_deg=20")
    got = mix.simulate(6, seed=2)
    assert got.truth.H is not None and got.truth.codes is not None
    # ideal rows: the true channel and codes are the known ones
    assert torch.equal(got.truth.H[0], got.H[0]) and torch.equal(got.truth.codes[0], got.codes[0])
    # CSI-error rows: the known H differs from the true one; phase-noise rows: the codes differ
    assert not torch.equal(got.truth.H[1], got.H[1]) and torch.equal(got.truth.codes[1], got.codes[1])
    assert torch.equal(got.truth.H[2], got.H[2]) and not torch.equal(got.truth.codes[2], got.codes[2])
