"""Every code block in README.md and docs/*.md runs, as written or at tiny settings, in a fresh folder.

A ```python block runs as a script; a ```bash block runs line by line in bash (`.venv/bin/` means
this interpreter's bin folder). Blocks of other languages (text, toml, json) are not code. An HTML
comment on the line before a block adjusts it:

    <!-- test: "epochs=5" -> "epochs=1 train_limit=256"; "--n 100" -> "--n 8" -->    (run it smaller)
    <!-- test: skip: why -->                                                       (not run; few, with a reason)

Blocks of one page run in order in one folder (holding links to the repository's src/ and
benchmarks/), so a later block can use what an earlier one wrote (a trained run, say). A page whose
first line is `<!-- test: continues OTHER.md -->` runs right after OTHER.md, in its folder (it
uses what that page trained).
docs/experiments/ is history (the commands of their time), not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- test: (?P<directive>[^\n]*?) -->\n)?```(?P<lang>[a-z]*)[^\n]*\n(?P<body>.*?)\n```", re.S)
REPLACE = re.compile(r'"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"')
MAX_SKIPPED = 6
CONTINUES = re.compile(r"<!-- test: continues (\S+\.md) -->")


def groups() -> dict[str, list[Path]]:
    """Return {first page: [it, then the pages that continue it]}."""
    out: dict[str, list[Path]] = {p.name: [p] for p in PAGES if not CONTINUES.match(p.read_text())}
    for p in PAGES:
        m = CONTINUES.match(p.read_text())
        if m:
            assert m[1] in out, f"{p.name} continues {m[1]}, which is not a page that runs first"
            out[m[1]].append(p)
    return out


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """Return (language, code, directive) for each fenced block of a markdown page, in order."""
    return [(m["lang"], m["body"], m["directive"]) for m in FENCE.finditer(page.read_text())]


def _adjusted(code: str, directive: str | None) -> str:
    for old, new in REPLACE.findall(directive or ""):
        assert old in code, f"the test directive replaces {old!r}, which the block does not contain"
        code = code.replace(old, new)
    return code


def _run(lang: str, code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    if lang == "python":
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
    bindir = str(Path(sys.executable).parent) + "/"
    script = "set -euo pipefail\n" + code.replace(".venv/bin/", bindir)
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_pages_have_runnable_blocks_and_few_skips():
    found = {p.name: blocks(p) for p in PAGES}
    assert {"README.md", "design.md", "learner.md", "classifier.md", "diffusion.md", "evaluation.md"} <= set(found)
    skipped = [(name, d) for name, bs in found.items() for _, _, d in bs if d and d.startswith("skip")]
    assert len(skipped) <= MAX_SKIPPED, skipped
    assert all(len(d) > len("skip: ") + 10 for _, d in skipped), skipped  # every skip says why
    langs = {lang for bs in found.values() for lang, _, _ in bs}
    assert langs <= {"python", "bash", "text", "toml", "json", ""}, langs


GROUPS = groups()


@pytest.mark.integration
@pytest.mark.parametrize("first", list(GROUPS), ids=list(GROUPS))
def test_every_code_block_of_a_page_runs(first, tmp_path, fashion_mnist_dir):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2"}
    env.pop("MINIDIFFUSION_DATA", None)
    for name in ("src", "benchmarks"):  # paths the pages name relative to the repository root
        (tmp_path / name).symlink_to(ROOT / name)
    for page in GROUPS[first]:
        ran = 0
        for i, (lang, code, directive) in enumerate(blocks(page)):
            if lang not in ("python", "bash") or (directive or "").startswith("skip"):
                continue
            r = _run(lang, _adjusted(code, directive), tmp_path, env)
            assert r.returncode == 0, f"{page.name}, block {i + 1} ({lang}) failed:\n{code}\n--- stderr:\n" \
                                      f"{r.stderr[-3000:]}"
            ran += 1
        if page.name != "design.md":
            assert ran, f"{page.name} has no code block that runs"


def test_a_directive_is_one_line_and_never_swallows_a_block(tmp_path):
    page = tmp_path / "p.md"
    page.write_text('<!-- test: continues x.md -->\ntext\n```python\nprint(1)\n```\n'
                    '<!-- test: "a" -> "b" -->\n```bash\necho a\n```\n')
    assert blocks(page) == [("python", "print(1)", None), ("bash", "echo a", '"a" -> "b"')]
