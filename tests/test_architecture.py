"""The layers of docs/architecture.md: no module imports from a layer below its own.

Every ``from risloc...``/relative import anywhere in a module's file (module level or inside a
function) is read with ``ast``; the estimator registry's lazy module names are strings, not
imports, so they are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "risloc"

LAYERS = [
    {"scenario", "physics", "grids", "_files", "_toml", "_provenance", "_devices", "seeds", "cuda_graphs"},
    {"simulate", "scenes", "io", "data"},
    {"covariance"},
    {"crb", "metrics", "estimators"},
    {"nn"},
    {"bench"},
    {"cli", "__main__", "__init__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}

ALLOWED_DOWNWARD = {
    ("covariance", "estimators"): "the rank of the maximum-likelihood covariance fit is chosen by the likelihood order "
                                  "rules of estimators/order.py (a lazy import inside ml_covariance)",
    ("io", "crb"): "CRB files hold risloc.crb.CRBResult, and crb_file computes the bounds it writes",
}
"""The downward edges docs/architecture.md names, each with its reason; any other fails."""


def _top(path: Path) -> str:
    """The first component of a module path under src/risloc (``estimators`` for estimators/ml.py)."""
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported(path: Path) -> set[str]:
    """Top-level risloc modules imported by the file at ``path``."""
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(SRC).parent.parts  # e.g. ("estimators",)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "risloc":
                    continue
                names = parts[1:] or [a.name for a in node.names]
            else:
                base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
                parts = base + ([p for p in (node.module or "").split(".") if p])
                names = parts[:1] if parts else [a.name for a in node.names]
            if names:
                out.add(names[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "risloc" and len(parts) > 1:
                    out.add(parts[1])
    return out


def test_every_module_belongs_to_a_layer():
    tops = {_top(p) for p in SRC.rglob("*.py")} - {"weights"}
    assert tops <= set(LEVEL), f"modules missing from docs/architecture.md's layers: {sorted(tops - set(LEVEL))}"


def test_no_module_imports_from_a_lower_layer():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        top = _top(path)
        for name in _imported(path):
            if name in LEVEL and LEVEL[name] > LEVEL[top] and (top, name) not in ALLOWED_DOWNWARD:
                bad.append(f"{path.relative_to(SRC)} imports {name} (layer {LEVEL[name]} > {LEVEL[top]})")
    assert not bad, "\n".join(bad)


def test_commands_do_not_import_matplotlib():
    """Every ``risloc`` command builds every subcommand's parser; plotting (the bench's figures)
    imports matplotlib only when a figure is drawn."""
    import subprocess
    import sys

    code = ("import sys; import risloc.cli as c; sys.argv = ['risloc', 'simulate', '--help']\n"
            "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
            "import risloc.bench\nprint('matplotlib' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "False"
