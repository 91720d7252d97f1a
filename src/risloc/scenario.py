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

from ._files import InputError
from ._files import atomic_write_text  # noqa: F401  (re-exported: risloc.scenario.atomic_write_text)
from ._toml import coerce, read_toml, toml_value
from ._toml import dumps as toml_dumps  # noqa: F401  (re-exported: risloc.scenario.toml_dumps)

SIGNAL_MODELS = ("stochastic", "static")
CODEBOOKS = ("random", "dft")
RIS_AMPLITUDE_MODELS = ("ideal", "practical")

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

    # --- impairments (docs/model.md, "Impairments"; all off by default) ---------------------
    csi_nmse_db: float | None = None
    """None (perfect CSI, the default): the receiver knows H. A number: the receiver knows
    H-hat = H + E, E_mn ~ CN(0, eps |H|_F^2 / (M N)), eps = 10^(csi_nmse_db/10), drawn per scene.
    In TOML the line is left out for None; on the command line ``none`` (or ``off``)."""
    ris_phase_noise_deg: float = 0.0
    """Standard deviation sigma [deg] of the RIS phase error: realised code
    c~_ln = c_ln exp(j delta_ln), delta_ln ~ N(0, sigma^2), per element and snapshot (0: none)."""
    ris_amplitude: str = "ideal"
    """'ideal': |c~_ln| = 1; 'practical': the phase-dependent amplitude
    |c~_ln| = (1 - beta_min) ((sin(theta_ln - mu) + 1) / 2)^kappa + beta_min, theta_ln the commanded phase."""
    ris_beta_min: float = 0.2
    """beta_min of the practical RIS amplitude (its smallest value), in [0, 1]."""
    ris_mu: float = 0.0
    """mu of the practical RIS amplitude (the phase offset of its minimum at -pi/2 + mu) [rad]."""
    ris_kappa: float = 1.6
    """kappa of the practical RIS amplitude (steepness), >= 0."""
    ris_failed_fraction: float = 0.0
    """Fraction f of failed RIS elements: round(f N) elements, drawn per scene without
    replacement, have c~_ln = 0 in every snapshot (0: none)."""

    # ---------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_elements(self) -> int:
        """N = n_h * n_v."""
        return self.n_h * self.n_v

    @property
    def n_failed_elements(self) -> int:
        """round(ris_failed_fraction * N) (halves rounded up): the failed RIS elements of every scene."""
        return int(math.floor(self.ris_failed_fraction * self.n_elements + 0.5))

    @property
    def csi_error(self) -> bool:
        """True when the receiver's H is an estimate (``csi_nmse_db`` set)."""
        return self.csi_nmse_db is not None

    @property
    def code_impairments(self) -> bool:
        """True when the realised RIS codes differ from the commanded ones (phase noise,
        practical amplitude or failed elements)."""
        return self.ris_phase_noise_deg > 0 or self.ris_amplitude != "ideal" or self.n_failed_elements > 0

    @property
    def impaired(self) -> bool:
        """True when any impairment is on (CSI error or realised codes != commanded codes)."""
        return self.csi_error or self.code_impairments

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
        # impairments
        finite = lambda name: isinstance(getattr(self, name), (int, float)) and math.isfinite(getattr(self, name))  # noqa: E731
        need(
            self.csi_nmse_db is None or finite("csi_nmse_db"),
            "csi_nmse_db",
            "must be a finite number of dB, or None (none/off) for perfect CSI",
        )
        need(finite("ris_phase_noise_deg") and self.ris_phase_noise_deg >= 0, "ris_phase_noise_deg", "must be a finite number >= 0 (degrees)")
        need(self.ris_amplitude in RIS_AMPLITUDE_MODELS, "ris_amplitude", f"must be one of {RIS_AMPLITUDE_MODELS}")
        need(finite("ris_beta_min") and 0 <= self.ris_beta_min <= 1, "ris_beta_min", "must be in [0, 1]")
        need(finite("ris_mu"), "ris_mu", "must be a finite angle [rad]")
        need(finite("ris_kappa") and self.ris_kappa >= 0, "ris_kappa", "must be a finite number >= 0")
        need(finite("ris_failed_fraction") and 0 <= self.ris_failed_fraction < 1, "ris_failed_fraction", "must be in [0, 1)")
        need(
            self.n_failed_elements < self.n_elements,
            "ris_failed_fraction",
            f"fails round(f N) = {self.n_failed_elements} of the N = {self.n_elements} elements; at least one must work",
        )

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
        kwargs = {k: coerce(known[k], v) for k, v in data.items() if k in known}
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
            value = getattr(self, f.name)
            if value is None:  # TOML has no null: the field is left at its default (None)
                lines.append(f"# {f.name}: none")
            else:
                lines.append(f"{f.name} = {toml_value(value)}")
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
            changes[name] = coerce(known[name], value.strip())
        return self.replace(**changes)
