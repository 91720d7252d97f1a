"""The README's results table equals the files it names.

Every row of the table under "Which method" names, in its last column, a results folder
(a reference-style link ``[label][ref]`` whose definition ``[ref]: path`` points at the folder or
a file in it); every number of the row must equal the value in that folder's ``results.json``
(written by ``risloc bench``) with the README's rounding: success and K accuracy to three
decimals as Python formats the stored float (``f"{x:.3f}"``, so 0.1415 reads 0.141, as in the
run's report.md), scenes/s to three significant figures, the one-scene latency (median) in whole ms, "–" where the run made no latency calls. A row labelled "held-out" must come from a run
on the held-out seed. A stale figure, a mistyped one or a wrong folder fails here.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SNR_RANGE = re.compile(r"(−|-)?(\d+)…(\d+) dB")
REF_DEF = re.compile(r"^\[([^\]]+)\]:\s*(\S+)\s*$", re.M)
REF_USE = re.compile(r"^\[([^\]]+)\]\[([^\]]+)\]$")
DASH = "–"


def _snr_range(header: str) -> tuple[float, float]:
    m = SNR_RANGE.search(header)
    assert m, f"README table: column {header!r} names no SNR range"
    lo = float(m.group(2)) * (-1 if m.group(1) else 1)
    return lo, float(m.group(3))


def results_table(text: str) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """The header, the rows (cells stripped) and the link definitions of the README table whose
    first column is ``method`` and last column ``results``."""
    lines = text.splitlines()
    refs = dict(REF_DEF.findall(text))
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == "method" and cells[-1] == "results":
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return cells, rows, refs
    raise AssertionError("README.md: no table with the columns 'method' … 'results'")


@lru_cache(maxsize=None)
def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text(encoding="utf-8"))


def _folder(cell: str, refs: dict[str, str], base: Path) -> tuple[str, Path]:
    m = REF_USE.match(cell)
    assert m, f"results cell {cell!r} is not a reference link [label][ref]"
    label, ref = m.groups()
    assert ref in refs, f"results cell {cell!r}: no definition [{ref}]: path in the README"
    path = (base / refs[ref]).resolve()
    folder = path if path.is_dir() else path.parent
    assert (folder / "results.json").is_file(), f"[{ref}]: {refs[ref]} has no results.json beside it"
    return label, folder


def _sig3(x: float) -> float:
    """``x`` rounded to three significant figures."""
    if x == 0:
        return 0.0
    return round(x, 2 - int(math.floor(math.log10(abs(x)))))


def _number(cell: str) -> float:
    return float(cell.replace("**", "").replace(" ", "").replace("\u202f", "").replace("\u00a0", ""))


def _snr_row(rows: list[dict], lo: float, hi: float) -> dict:
    found = [r for r in rows if r["snr_lo"] == lo and r["snr_hi"] == hi]
    assert found, f"no SNR range {lo:g}…{hi:g} dB in the file"
    return found[0]


def expected(header: str, method: str, res: dict) -> str:
    """The README's text for column ``header`` of ``method`` from a parsed ``results.json``."""
    crb_row = method.startswith("CRB-efficient")
    h = header.lower()
    if crb_row:
        ref = res["crb"]["reference"]
        if h.startswith("success"):
            lo, hi = _snr_range(header)
            return f"{ref[f'snr_{lo:g}_{hi:g}']['success_crb']:.3f}"
        return DASH  # no K estimate, and the bound's own speed is not a method's
    if method not in res["methods"]:
        return "(method not in the file)"
    m = res["methods"][method]
    assert m["status"] == "ok", f"{method}: status {m['status']} in the file"
    if h.startswith("success") or h.startswith("k accuracy"):
        row = _snr_row(m["snr_ranges"], *_snr_range(header))
        return f"{row['success' if h.startswith('success') else 'K_acc']:.3f}"
    if h.startswith("scenes/s"):
        return repr(_sig3(m["timing"]["scenes_per_s"]))
    if h.startswith("one-scene latency"):
        latency = m.get("latency_ms")
        return f"{latency['median']:.0f}" if latency else DASH  # a run without latency calls
    raise AssertionError(f"README table: no rule for column {header!r}")


def check_table(text: str, base: Path = ROOT) -> list[str]:
    """Every disagreement between the README table in ``text`` and its files (empty: none)."""
    header, rows, refs = results_table(text)
    bad = []
    for cells in rows:
        assert len(cells) == len(header), f"row {cells} has {len(cells)} cells, the header {len(header)}"
        method = cells[0].replace("`", "").replace("**", "").split(" (")[0].strip()
        if method.startswith("CRB-efficient"):
            method = cells[0]
        label, folder = _folder(cells[-1], refs, base)
        res = _results(folder)
        if "held-out" in label and not res["seeds"].get("held_out"):
            bad.append(f"{cells[-1]}: labelled held-out, but {folder.name} ran on seed {res['seeds'].get('scenes')}")
        for col, cell in zip(header[1:-1], cells[1:-1]):
            want = expected(col, method, res)
            if want == DASH or cell == DASH:
                ok = cell == want
            else:
                try:
                    ok = _number(cell) == float(want)
                except ValueError:  # the file holds no such number
                    ok = False
            if not ok:
                bad.append(f"{cells[0]} / {col}: README {cell}, {folder.relative_to(ROOT)}/results.json {want}")
    return bad


def test_readme_table_equals_its_results_files():
    assert check_table(README.read_text(encoding="utf-8")) == []


def test_readme_table_covers_every_method_of_its_runs():
    header, rows, refs = results_table(README.read_text(encoding="utf-8"))
    by_folder: dict[Path, set[str]] = {}
    for cells in rows:
        _, folder = _folder(cells[-1], refs, ROOT)
        by_folder.setdefault(folder, set()).add(cells[0].replace("`", "").replace("**", "").split(" (")[0].strip())
    for folder, shown in by_folder.items():
        ran = {k for k, m in _results(folder)["methods"].items() if m["status"] == "ok" and not m.get("known_k")}
        assert ran <= shown, f"{folder.name}: methods missing from the README table: {sorted(ran - shown)}"
        assert "CRB-efficient" in shown, f"{folder.name}: no CRB-efficient row"


def _mutations(text: str):
    """Copies of ``text`` with one number of the results table changed in its last digit."""
    header, rows, _ = results_table(text)
    lines = text.splitlines(keepends=True)
    start = next(i for i, l in enumerate(lines) if l.startswith("| method |")) + 2
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells[1:-1], start=1):
            if cell == DASH:
                continue
            digits = cell.replace("**", "")
            last = digits.rstrip()[-1]
            new = digits[:-1] + str((int(last) + 1) % 10)
            changed = list(cells)
            changed[c] = new
            copy = list(lines)
            copy[start + r] = "| " + " | ".join(changed) + " |\n"
            yield f"{cells[0]} / {header[c]}: {cell} -> {new}", "".join(copy)


def test_a_changed_figure_fails():
    text = README.read_text(encoding="utf-8")
    mutations = list(_mutations(text))
    assert len(mutations) >= 30
    for what, copy in mutations:
        assert check_table(copy), f"changing {what} went unnoticed"


def test_a_wrong_folder_fails(tmp_path):
    """The same numbers attributed to another run of the same command disagree."""
    text = README.read_text(encoding="utf-8")
    other = "benchmarks/results/h100/bench-heldout-510e4de/README.md"
    assert (ROOT / other).is_file()
    copy = re.sub(r"^\[h1\]:.*$", f"[h1]: {other}", text, flags=re.M)
    assert check_table(copy)


def test_readme_picture_is_drawn_from_the_cited_run(tmp_path):
    """The README's picture exists, and the script that draws it finds every method of the run and
    the CRB-efficient curve in its ``results.json``."""
    import runpy

    text = README.read_text(encoding="utf-8")
    m = re.search(r"!\[[^\]]*\]\((docs/img/[^)]+\.png)\)", text)
    assert m and (ROOT / m.group(1)).is_file()
    drawn = re.search(r"Drawn from\s+\[[^\]]*\]\(([^)]+)\)", text[m.end():])
    assert drawn, "the picture's caption names no results folder ('Drawn from [..](folder)')"
    folder = (ROOT / drawn.group(1)).resolve()
    folder = folder if folder.is_dir() else folder.parent
    plot = runpy.run_path(str(ROOT / "benchmarks" / "plot_success_vs_snr.py"))
    res = _results(folder)
    curves, crb = plot["curves_from_results"](res)
    assert set(curves) == {k for k, v in res["methods"].items() if not v["known_k"]}
    assert crb is not None and crb["snr"] == [-2.5, 2.5, 7.5, 12.5, 17.5]
    assert crb["success_crb"][-1] == pytest.approx(res["crb"]["reference"]["snr_bin_15_20"]["success_crb"])
    assert all(c["snr"] == crb["snr"] for c in curves.values())
