"""The committed reliability figures are the generator's output on the committed raw rows (no fault is run here)."""

from __future__ import annotations

import copy
import json

import pytest

from tests.faults import report


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return report.read_rows(report.ROWS)


def test_the_committed_page_and_readme_block_equal_the_generators_output(rows):
    page, readme = report.PAGE.read_text(), report.README.read_text()
    new_page, new_readme = report.rendered(rows, page, readme)
    assert new_page == page, "docs/reliability.md is stale: run `python -m tests.faults.report`"
    assert new_readme == readme, "README.md's reliability block is stale: run `python -m tests.faults.report`"


def test_every_row_says_where_it_was_measured_and_each_set_is_covered(rows):
    assert "faults" in {r["suite"] for r in rows} and {r["suite"] for r in rows} <= set(report.SUITES)
    for row in rows:
        assert isinstance(row["seed"], int) and row["machine"]["cpus"] >= 1 and row["machine"]["torch"], row
    kills = [r for r in rows if r["section"] == "kill"]
    assert kills and all(isinstance(r["faults"], int) and isinstance(r["lost"], int) for r in kills)


def test_a_changed_number_in_the_rows_changes_the_page(rows):
    page = report.PAGE.read_text()
    changed = copy.deepcopy(rows)
    kill = next(r for r in changed if r["section"] == "kill" and "recomputed" in r)
    kill["recomputed"] += 1
    assert report.rendered(changed, page, "")[0] != page


def test_only_the_text_between_markers_is_replaced_and_missing_markers_are_named():
    text = "head\n<!-- figures:kills:begin -->\nold\n<!-- figures:kills:end -->\ntail\n"
    out = report.replace_between(text, "<!-- figures:kills:begin -->", "<!-- figures:kills:end -->", "new", "x.md")
    assert out == "head\n<!-- figures:kills:begin -->\nnew\n<!-- figures:kills:end -->\ntail\n"
    with pytest.raises(ValueError, match=r"x\.md: expected one '<!-- a -->' followed by one '<!-- b -->'"):
        report.replace_between("no markers", "<!-- a -->", "<!-- b -->", "new", "x.md")
    page = "".join(f"<!-- figures:{name}:begin -->\n<!-- figures:{name}:end -->\n" for name in report.render_blocks([]))
    assert report.rendered([], page, "a README without its markers")[1] == "a README without its markers"


def test_rows_without_where_they_were_measured_are_refused(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"kind": "extract driver SIGKILL", "faults": 1, "seed": 1}) + "\n")
    with pytest.raises(ValueError, match=r"old\.jsonl:1: row lacks \['section', 'test', 'suite', 'machine', 'run'\]"):
        report.read_rows(path)


def test_merging_replaces_a_test_measured_again_and_keeps_the_others():
    def row(test: str, run: str, n: int) -> dict:
        return {"section": "kill", "test": test, "suite": "faults", "seed": 1, "run": run, "faults": n}

    committed = [row("a", "r1", 1), row("b", "r1", 2)]
    new = [row("a", "r2", 3), row("a", "r3", 4), row("a", "r3", 5)]
    assert [(r["test"], r["faults"]) for r in report.merge(committed, new)] == [("a", 4), ("a", 5), ("b", 2)]
