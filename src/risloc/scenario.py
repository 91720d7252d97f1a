"""The `Scenario`: every number of the physical model (docs/model.md).

Angles are stored in radians and lengths in metres, as everywhere inside risloc;
powers are linear unless a field name ends in ``_db``. A scenario is saved and
loaded as TOML (:meth:`Scenario.save`, :meth:`Scenario.load`) and every field can be
overridden from the command line (``--set field=value`` or the sub-command's own
flags).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ._files import InputError, read_toml
from ._files import atomic_write_text  # noqa: F401  (re-exported: risloc.scenario.atomic_write_text)

SIGNAL_MODELS = ("stochastic", "static")
CODEBOOKS = ("random", "dft")

_DEG = math.pi / 180.0


@dataclass
class Scenario:
    """The measurement model and the distribution of scenes (defaults = docs/model.md).

    Geometry: a uniform planar RIS of ``n_h`` x ``n_v`` elements in the x-y plane,
    boresight +z; element (i, j) has flat index ``n = j * n_h + i``.
    A point (phi, theta, r) sits at ``r * (cos(theta) sin(phi), sin(theta), cos(theta) cos(phi))``.
    """

    # --- geometry -------------------------------------------------------------------------
    wavelength: float = 0.3
    """Carrier wavelength lambda [m] (1 GHz)."""
    n_h: int = 12
    """RIS elements along x (horizontal index i, fastest in the flat order)."""
    n_v: int = 12
    """RIS elements along y (vertical index j)."""
    spacing_h: float = 0.15
    """Horizontal element spacing d_H [m] (lambda/2)."""
    spacing_v: float = 0.15
    """Vertical element spacing d_V [m] (lambda/2)."""

    # --- sources --------------------------------------------------------------------------
    k_max: int = 5
    """Largest number of sources; truth/estimate arrays are padded to this length."""
    k_fixed: int = 0
    """0: K ~ uniform on {1, ..., k_max}; otherwise every scene has exactly this many sources."""
    phi_min: float = -60 * _DEG
    """Smallest source azimuth [rad]."""
    phi_max: float = 60 * _DEG
    """Largest source azimuth [rad]."""
    theta_min: float = -30 * _DEG
    """Smallest source elevation [rad]."""
    theta_max: float = 30 * _DEG
    """Largest source elevation [rad]."""
    r_min: float = 0.5
    """Smallest source range from the RIS centre [m]."""
    r_max: float = 10.0
    """Largest source range from the RIS centre [m]."""
    min_separation: float = 5 * _DEG
    """Smallest angle between the direction vectors of two sources of one scene [rad]."""
    power_spread_db: float = 6.0
    """Source powers p_k = 10^(u_k/10), u_k ~ U[-power_spread_db, 0]."""
    signal: str = "stochastic"
    """'stochastic': s_k(l) ~ CN(0, p_k) i.i.d. over l; 'static': s_k(l) = g_k ~ CN(0, p_k) for all l."""

    # --- BS-RIS channel -------------------------------------------------------------------
    m_bs: int = 16
    """Antennas of the base-station uniform linear array."""
    bs_spacing: float = 0.15
    """BS antenna spacing [m] (lambda/2)."""
    bs_psi_max: float = 60 * _DEG
    """BS-side angle psi ~ U[-bs_psi_max, bs_psi_max] [rad]."""
    bs_phi_max: float = 60 * _DEG
    """Azimuth of the BS seen from the RIS, phi_B ~ U[-bs_phi_max, bs_phi_max] [rad]."""
    bs_theta_max: float = 30 * _DEG
    """Elevation of the BS seen from the RIS, theta_B ~ U[-bs_theta_max, bs_theta_max] [rad]."""
    bs_range: float = 30.0
    """Distance r_B of the BS from the RIS centre [m]."""
    rician_min: float = 0.5
    """Smallest Rician factor kappa (linear)."""
    rician_max: float = 10.0
    """Largest Rician factor kappa (linear)."""

    # --- RIS codes and snapshots ----------------------------------------------------------
    codebook: str = "random"
    """'random': i.i.d. b-bit phases; 'dft': 2-D DFT beams on a regular frequency sub-grid, b-bit quantised."""
    code_bits: int = 3
    """Phase resolution b of the RIS (2^b levels)."""
    snapshots: int = 16
    """Number of snapshots L (one RIS code per snapshot)."""
    snr_db_min: float = -5.0
    """Smallest per-scene SNR [dB]."""
    snr_db_max: float = 20.0
    """Largest per-scene SNR [dB]."""

    # ---------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_elements(self) -> int:
        """N = n_h * n_v."""
        return self.n_h * self.n_v

    def validate(self) -> None:
        """Refuse impossible values with a message that names the field."""

        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ValueError(f"Scenario.{name} = {getattr(self, name)!r}: {what}")

        for name in ("wavelength", "spacing_h", "spacing_v", "bs_spacing", "bs_range", "r_min"):
            need(getattr(self, name) > 0, name, "must be > 0")
        for name in ("n_h", "n_v", "m_bs", "snapshots", "k_max"):
            need(int(getattr(self, name)) == getattr(self, name) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(0 <= self.k_fixed <= self.k_max, "k_fixed", f"must be 0 (random K) or in 1..k_max={self.k_max}")
        need(self.phi_min < self.phi_max, "phi_max", "must exceed phi_min")
        need(self.theta_min < self.theta_max, "theta_max", "must exceed theta_min")
        need(-math.pi / 2 <= self.theta_min and self.theta_max <= math.pi / 2, "theta_max", "elevations must lie in [-pi/2, pi/2]")
        need(self.r_min <= self.r_max, "r_max", "must be >= r_min")
        need(self.min_separation >= 0, "min_separation", "must be >= 0")
        need(self.power_spread_db >= 0, "power_spread_db", "must be >= 0")
        need(self.signal in SIGNAL_MODELS, "signal", f"must be one of {SIGNAL_MODELS}")
        need(self.codebook in CODEBOOKS, "codebook", f"must be one of {CODEBOOKS}")
        need(1 <= self.code_bits <= 16, "code_bits", "must be in 1..16")
        need(0 < self.rician_min <= self.rician_max, "rician_max", "need 0 < rician_min <= rician_max")
        need(self.snr_db_min <= self.snr_db_max, "snr_db_max", "must be >= snr_db_min")

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> "Scenario":
        """Build from a mapping; unknown keys are an error when ``strict``, ignored otherwise."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown and strict:
            raise ValueError(f"unknown Scenario field(s) {unknown}; known: {sorted(known)}")
        kwargs = {k: _coerce(known[k], v) for k, v in data.items() if k in known}
        return cls(**kwargs)

    def to_json(self) -> str:
        """The JSON stored in a scene file's ``scenario`` attribute (all fields)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Scenario":
        """Read a scene file's ``scenario`` attribute; unknown keys from other tools are ignored."""
        return cls.from_dict(json.loads(text), strict=False)

    def to_toml(self) -> str:
        lines = ["# risloc scenario (units: metres, radians, linear power unless *_db)"]
        for f in fields(self):
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write as TOML (atomically: temporary name, then rename)."""
        atomic_write_text(path, self.to_toml())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scenario":
        """A scenario TOML file (``InputError`` naming the file if it is not TOML or not a scenario)."""
        data = read_toml(path)
        if "scenario" in data and isinstance(data["scenario"], dict):
            data = data["scenario"]
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None

    def replace(self, **changes: Any) -> "Scenario":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, assignments: list[str]) -> "Scenario":
        """Apply ``field=value`` strings (values parsed by the field's type)."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form field=value")
            name, value = item.split("=", 1)
            name = name.strip().replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown Scenario field {name!r}; known: {sorted(known)}")
            changes[name] = _coerce(known[name], value.strip())
        return self.replace(**changes)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    typ = f.type if isinstance(f.type, type) else {"float": float, "int": int, "str": str, "bool": bool}.get(str(f.type), str)
    try:
        if typ is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if typ is int and isinstance(value, str):
            return int(float(value)) if float(value).is_integer() else int(value)
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"field {f.name!r}: cannot read {value!r} as {typ.__name__}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_dumps(tables: dict[str, dict[str, Any]]) -> str:
    """Write a mapping of flat tables (``{"section": {"key": value}}``) as TOML."""
    out: list[str] = []
    for section, table in tables.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
        out.append("")
    return "\n".join(out)
