"""The Scenario: defaults of docs/model.md, validation, TOML / JSON round trips, overrides."""

from __future__ import annotations

import json
import math

import pytest

from risloc import Scenario

DEG = math.pi / 180


def test_defaults_are_the_spec():
    sc = Scenario()
    assert (sc.wavelength, sc.n_h, sc.n_v, sc.spacing_h, sc.spacing_v) == (0.3, 12, 12, 0.15, 0.15)
    assert sc.n_elements == 144 and sc.m_bs == 16 and sc.snapshots == 16 and sc.k_max == 5 and sc.k_fixed == 0
    assert math.isclose(sc.phi_max, 60 * DEG) and math.isclose(sc.theta_min, -30 * DEG)
    assert (sc.r_min, sc.r_max, sc.power_spread_db, sc.bs_range) == (0.5, 10.0, 6.0, 30.0)
    assert math.isclose(sc.min_separation, 5 * DEG)
    assert (sc.rician_min, sc.rician_max, sc.code_bits, sc.snr_db_min, sc.snr_db_max) == (0.5, 10.0, 3, -5.0, 20.0)
    assert (sc.signal, sc.codebook) == ("stochastic", "random")


def test_toml_round_trip(tmp_path):
    sc = Scenario(k_max=3, k_fixed=2, signal="static", codebook="dft", snr_db_min=0.0, snr_db_max=0.0, r_max=4.5)
    path = tmp_path / "sc.toml"
    sc.save(path)
    assert Scenario.load(path) == sc
    assert [p.name for p in tmp_path.iterdir()] == ["sc.toml"]  # written atomically, no leftovers
    # a [scenario] table with a subset of the fields also loads; the rest are defaults
    path.write_text('[scenario]\nk_max = 4\nsignal = "static"\n')
    assert Scenario.load(path) == Scenario(k_max=4, signal="static")
    path.write_text("k_maxx = 4\n")
    with pytest.raises(ValueError, match="unknown Scenario field"):
        Scenario.load(path)


def test_json_round_trip_and_other_tools():
    sc = Scenario(m_bs=8, code_bits=2)
    assert Scenario.from_json(sc.to_json()) == sc
    assert set(json.loads(sc.to_json())) == {f for f in Scenario.__dataclass_fields__}
    # the reference files carry only the required keys; unknown keys are ignored
    assert Scenario.from_json('{"wavelength": 0.3, "n_h": 12, "signal": "static", "made_by": "x"}') == Scenario(signal="static")


def test_overrides_parse_by_field_type():
    sc = Scenario().with_overrides(["k_max=3", "r_max=5", "signal=static", "snr-db-min=-2.5"])
    assert sc.k_max == 3 and isinstance(sc.k_max, int) and sc.r_max == 5.0 and sc.signal == "static" and sc.snr_db_min == -2.5
    with pytest.raises(ValueError, match="unknown Scenario field 'kmax'"):
        Scenario().with_overrides(["kmax=3"])
    with pytest.raises(ValueError, match="field=value"):
        Scenario().with_overrides(["k_max"])
    with pytest.raises(ValueError, match="'k_max': cannot read 'three'"):
        Scenario().with_overrides(["k_max=three"])


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"k_fixed": 6}, "k_fixed"),
        ({"signal": "coherent"}, "signal"),
        ({"codebook": "hadamard"}, "codebook"),
        ({"r_min": 0.0}, "r_min"),
        ({"r_min": 5.0, "r_max": 1.0}, "r_max"),
        ({"snr_db_min": 10.0, "snr_db_max": 0.0}, "snr_db_max"),
        ({"n_h": 0}, "n_h"),
        ({"code_bits": 0}, "code_bits"),
        ({"theta_max": 2.0}, "theta_max"),
    ],
)
def test_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"Scenario.{field}"):
        Scenario(**changes)
