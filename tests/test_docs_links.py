"""Every relative link of the repository's Markdown (README.md, CONTRIBUTING.md, docs/, the
READMEs and reports under benchmarks/results/) names a file or folder of the repository, and
every ``#fragment`` into a Markdown file names one of its headings (GitHub's heading anchors).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").rglob("*.md")]
)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def links(text: str) -> list[str]:
    """The link targets of Markdown ``text``, code blocks and inline code left out."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    return [m.group(1) for m in LINK.finditer(text)]


def anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of ``text``: lower case, punctuation other than ``-``
    and ``_`` dropped, spaces turned into ``-``, repeats numbered ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchor_rules():
    text = "# Measured (one H100, torch 2.11, bf16)\n## A b\n## A b\n```\n# not a heading\n```\n"
    assert anchors(text) == {"measured-one-h100-torch-211-bf16", "a-b", "a-b-1"}
    assert links("[a](x.md) `[b](y.md)` ![c](d.png)\n```\n[e](f.md)\n```\n") == ["x.md", "d.png"]


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path):
    text = md.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.is_relative_to(ROOT) or not dest.exists():
            broken.append(f"{target} (no such file in the repository)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{md.relative_to(ROOT)}: " + "; ".join(broken)
