"""The documentation holds together: a short README, links that resolve, and code that cites only documents in the
repository (no torch, no Ray: plain file reads)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
CODE_DIRS = ("tec_model", "stages", "pipeline", "infra", "benchmarks", "experiments", "tests")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
DOC_PATH = re.compile(r"(?<![\w/.-])(docs/[\w./-]*\w(?:#[\w-]+)?)")
OUTSIDE_CITATION = re.compile(r"DESIGN §|issue [0-9]")


def markdown_files() -> list[Path]:
    """README.md and every markdown file under docs/ (and benchmarks/README.md)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    bench = ROOT / "benchmarks" / "README.md"
    return [*files, bench] if bench.exists() else files


def code_files() -> list[Path]:
    """The project's Python files: run_pipeline.py and the packages, scripts and tests named in CODE_DIRS."""
    files = [ROOT / "run_pipeline.py"]
    for name in CODE_DIRS:
        files += sorted(p for p in (ROOT / name).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a markdown text outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup stripped, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a markdown file defines: its headings' slugs (repeats numbered -1, -2, …) and HTML anchors."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of one markdown file whose target file, or heading anchor, does not exist."""
    problems = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …: not checked here
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{number}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES} (move detail to docs/)"


def test_slug_matches_github() -> None:
    assert slug("2. Base-model targets") == "2-base-model-targets"
    assert slug("`gpu_check.sh`: one GPU check, sized") == "gpu_checksh-one-gpu-check-sized"
    assert slug("Any Ray cluster: `ray job submit` with local code") == "any-ray-cluster-ray-job-submit-with-local-code"
    assert slug("4.1 Encoder and masking") == "41-encoder-and-masking"


def test_markdown_links_resolve() -> None:
    problems = [p for path in markdown_files() for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_docs_cited_in_code_exist() -> None:
    """Every ``docs/...`` path a .py file names exists, and so does its ``#anchor`` when it names one."""
    missing = []
    for path in code_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for cited in DOC_PATH.findall(line):
                file_part, _, anchor = cited.partition("#")
                dest = ROOT / file_part
                if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {cited}")
    assert not missing, "code cites documents that are not in the repository:\n" + "\n".join(missing)


def test_code_cites_no_outside_documents() -> None:
    found = []
    for path in code_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE_CITATION.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "citations of documents outside the repository:\n" + "\n".join(found)
