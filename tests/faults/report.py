"""docs/reliability.md's generated tables and the README's reliability block, rendered from the fault suite's rows.

The rows are what the tests measured (:mod:`tests.faults.figures`): ``$TEC_FAULT_FIGURES`` and ``$TEC_FAULT_REPORT``
files, merged into the committed ``docs/reliability_figures.jsonl`` so the tables can be regenerated::

    .venv/bin/python -m tests.faults.report FIGS.jsonl REPORT.jsonl   # merge new rows, then rewrite the docs
    .venv/bin/python -m tests.faults.report                           # rewrite the docs from the committed rows
    .venv/bin/python -m tests.faults.report --check                   # exit 1 when the docs are not up to date

Merging replaces every committed row of a test that the new files measured again (the newest run of each test
wins); nothing else is touched. Only the text between each block's markers is rewritten
(``<!-- figures:NAME:begin -->`` / ``<!-- figures:NAME:end -->`` in the page, ``<!-- reliability:begin -->`` /
``<!-- reliability:end -->`` in the README); a README without its markers is left alone.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ROWS, PAGE, README = REPO / "docs" / "reliability_figures.jsonl", REPO / "docs" / "reliability.md", REPO / "README.md"
SUITES = {"faults": "CI subset (`-m faults`)", "default": "default suite", "faults_full": "`faults_full`"}
SECTIONS = ("kill", "refusal", "fault", "input")
REQUIRED = ("section", "test", "suite", "seed", "machine", "run")
README_BEGIN, README_END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
_TMP = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+/")
# fields shown in their own columns (the rest of a row's numbers go to its "measured" column)
_COLUMNS = {"section", "test", "suite", "seed", "machine", "run", "load_1m", "wall_s", "kind", "faults", "survived",
            "units", "steps", "recomputed", "bound", "recomputed_max_per_kill", "lost", "objects_compared",
            "bytes_compared", "markers_compared", "tensors_compared", "values_compared", "steps_order_compared",
            "images_compared", "start_steps", "checkpointed_step_at_kills", "first_resumed_step", "outcome", "input",
            "case", "injected", "data_lost", "clear_errors", "files_kept", "bytes_kept", "objects_differing",
            "markers_rewritten", "tensors_differing", "files_changed"}


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, each checked to carry ``section``, ``test``, ``suite``, ``seed``, ``machine``
    and ``run``.

    Raises:
        ValueError: naming the file, the line and the missing field (rows written before the suite recorded where
            they were measured lack them).
    """
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [f for f in REQUIRED if f not in row]
        if missing:
            raise ValueError(f"{path}:{number}: row lacks {missing} (expected a row of tests.faults.figures.write)")
        if row["section"] not in SECTIONS or row["suite"] not in SUITES:
            raise ValueError(f"{path}:{number}: section {row['section']!r} / suite {row['suite']!r}: expected one "
                             f"of {SECTIONS} / {tuple(SUITES)}")
        rows.append(row)
    return rows


def _newest_run(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per test, only the rows of its last pytest session in ``rows`` (``run``: one id per session)."""
    last = {r["test"]: r["run"] for r in rows}
    return [r for r in rows if r["run"] == last[r["test"]]]


def merge(committed: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``committed`` without the tests ``new`` measured again, plus ``new``'s newest run of each; sorted by set and
    test id (stable: a test's rows keep their order)."""
    fresh = _newest_run(new)
    again = {r["test"] for r in fresh}
    rows = [r for r in committed if r["test"] not in again] + fresh
    order = list(SUITES)
    return sorted(rows, key=lambda r: (order.index(r["suite"]), r["test"]))


def machines(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Machine key (``m1``, ``m2``, … by first appearance) → description, from the rows' machine facts."""
    keys: dict[str, str] = {}
    for row in rows:
        label = machine_label(row["machine"])
        if label not in keys:
            keys[label] = f"m{len(keys) + 1}"
    return {key: label for label, key in keys.items()}


def machine_label(facts: dict[str, Any]) -> str:
    """``2-core x86_64 CPU, Python 3.11.7, torch 2.14.1, Ray 2.60.0``."""
    return (f"{facts['cpus']}-core {facts['arch']} CPU, Python {facts['python']}, torch {facts['torch']}, "
            f"Ray {facts['ray']}")


def _key(row: dict[str, Any], keys: dict[str, str]) -> str:
    label = machine_label(row["machine"])
    return next(k for k, v in keys.items() if v == label)


def _n(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_n(v) for v in value) + "]"
    return str(value).replace("|", "/")


# (field that must be present, field that must be absent, phrase): what a row compared and found equal
_COMPARED = (("objects_compared", "", "{objects_compared} objects, {bytes_compared} bytes"),
             ("bytes_compared", "objects_compared", "{bytes_compared} bytes"),
             ("markers_compared", "", "{markers_compared} raw markers"),
             ("tensors_compared", "", "{tensors_compared} tensors, {values_compared} values"),
             ("steps_order_compared", "", "{steps_order_compared} steps' sample indices"),
             ("images_compared", "", "{images_compared} images' targets"))
_RESUME = (("checkpointed_step_at_kills", "", "checkpointed at kills {checkpointed_step_at_kills}"),
           ("start_steps", "", "starts {start_steps}"),
           ("first_resumed_step", "start_steps", "first step {first_resumed_step}"))


def _phrases(row: dict[str, Any], spec: tuple[tuple[str, str, str], ...]) -> str:
    """The phrases of ``spec`` whose field the row has (and not the excluding one), joined; "—" for none."""
    values = {k: _n(v) for k, v in row.items()}
    parts = [phrase.format(**values) for need, without, phrase in spec if need in row and without not in row]
    return "; ".join(parts) or "—"


def _measured(row: dict[str, Any]) -> str:
    """The row's other measured fields, ``name value``, by name."""
    rest = {k: v for k, v in row.items() if k not in _COLUMNS}
    return ", ".join(f"{k.replace('_', ' ')} {_n(v)}" for k, v in sorted(rest.items())) or "—"


def _recomputed(row: dict[str, Any]) -> str:
    if "recomputed" not in row:
        return "—"
    text = _n(row["recomputed"])
    if "bound" in row:
        text += f" (≤ {_n(row['bound'])})"
    if "recomputed_max_per_kill" in row:
        text += f"; at most {_n(row['recomputed_max_per_kill'])} in flight at one kill"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_kills(rows: list[dict[str, Any]], keys: dict[str, str]) -> str:
    """Kills, concurrent jobs, full disk, resumes: one line per measured row."""
    header = ["set", "fault", "faults", "survived", "work", "recomputed (bound)", "compared, all equal", "data lost",
              "resume", "other measured", "wall s", "seed", "machine"]
    body = [[SUITES[r["suite"]], _n(r["kind"]), _n(r["faults"]), _n(r["survived"]),
             f"{_n(r['units'])} units" if "units" in r else (f"{_n(r['steps'])} steps" if "steps" in r else "—"),
             _recomputed(r), _phrases(r, _COMPARED), _n(r["lost"]), _phrases(r, _RESUME), _measured(r),
             _n(r.get("wall_s", "—")), str(r["seed"]), _key(r, keys)] for r in rows if r["section"] == "kill"]
    return "\n".join(_table(header, body))


def render_refusals(rows: list[dict[str, Any]], keys: dict[str, str]) -> str:
    """Refused starts and crash recovery: what was tried, how it ended, what was kept."""
    header = ["set", "what happened", "outcome", "kept", "data lost", "other measured", "seed", "machine"]
    body = [[SUITES[r["suite"]], _n(r["kind"]), _n(r["outcome"]),
             f"{_n(r['files_kept'])} files, {_n(r['bytes_kept'])} bytes" if "files_kept" in r else "—",
             _n(r["lost"]), _measured(r), str(r["seed"]), _key(r, keys)] for r in rows if r["section"] == "refusal"]
    return "\n".join(_table(header, body))


def render_store(rows: list[dict[str, Any]], keys: dict[str, str]) -> str:
    """Object-store faults, summed by set and kind."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in (r for r in rows if r["section"] == "fault"):
        g = groups.setdefault((r["suite"], r["kind"]), {"injected": 0, "survived": 0, "errors": 0, "lost": 0,
                                                       "images": 0, "bytes": 0, "seeds": [], "machines": []})
        g["injected"] += r["injected"]
        g["survived"] += r["injected"] if r["survived"] else 0
        g["errors"] += 0 if r["survived"] else 1
        g["lost"] += r["data_lost"]
        g["images"] += r.get("images_compared", 0)
        g["bytes"] += r.get("bytes_compared", 0)
        for field, value in (("seeds", str(r["seed"])), ("machines", _key(r, keys))):
            if value not in g[field]:
                g[field].append(value)
    order = list(SUITES)
    header = ["set", "fault kind", "injected", "survived by retry", "runs ending in a clear error",
              "compared after the re-run", "data lost", "seed", "machine"]
    body = []
    for (suite, kind), g in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        compared = ", ".join(p for p in (f"{_n(g['images'])} images" if g["images"] else "",
                                         f"{_n(g['bytes'])} bytes" if g["bytes"] else "") if p) or "—"
        body.append([SUITES[suite], kind, _n(g["injected"]), _n(g["survived"]), _n(g["errors"]), compared,
                     _n(g["lost"]), ", ".join(g["seeds"]), ", ".join(g["machines"])])
    return "\n".join(_table(header, body))


def render_inputs(rows: list[dict[str, Any]], keys: dict[str, str]) -> str:
    """Bad inputs, each with how it ended (the error's first line, temporary paths shortened)."""
    header = ["set", "bad input", "how it ended", "other measured", "seed", "machine"]
    body = [[SUITES[r["suite"]], _n(r["input"]), _TMP.sub("<tmp>/", _n(r["outcome"])), _measured(r), str(r["seed"]),
             _key(r, keys)] for r in rows if r["section"] == "input"]
    return "\n".join(_table(header, body))


def totals(rows: list[dict[str, Any]], suite: str) -> dict[str, int]:
    """One set's sums over its rows: tests, faults injected and survived, clear errors, units/steps recomputed,
    data lost, objects/bytes/tensors compared, bad inputs, wall seconds."""
    rs = [r for r in rows if r["suite"] == suite]
    kills, store = [r for r in rs if r["section"] == "kill"], [r for r in rs if r["section"] == "fault"]
    last_wall: dict[str, float] = {}
    for r in rs:
        last_wall[r["test"]] = max(last_wall.get(r["test"], 0.0), r.get("wall_s", 0.0))
    return {
        "tests": len({r["test"] for r in rs}),
        "faults": sum(r["faults"] for r in kills) + sum(r["injected"] for r in store),
        "survived": sum(r["survived"] for r in kills) + sum(r["injected"] for r in store if r["survived"]),
        "clear_errors": sum(1 for r in store if not r["survived"]),
        "in_errors": sum(r["injected"] for r in store if not r["survived"]) + sum(r["faults"] - r["survived"]
                                                                                  for r in kills),
        "recomputed": sum(r.get("recomputed", 0) for r in kills),
        "lost": sum(r["lost"] for r in rs if r["section"] in ("kill", "refusal"))
        + sum(r["data_lost"] for r in store),
        "objects": sum(r.get("objects_compared", 0) for r in kills),
        "bytes": sum(r.get("bytes_compared", 0) for r in kills + store),
        "tensors": sum(r.get("tensors_compared", 0) for r in kills),
        "refusals": sum(1 for r in rs if r["section"] == "refusal"),
        "inputs": sum(1 for r in rs if r["section"] == "input"),
        "wall_s": round(sum(last_wall.values())),
    }


def render_summary(rows: list[dict[str, Any]], keys: dict[str, str]) -> str:
    """Per set: the sums of :func:`totals`, the seeds and the machines."""
    header = ["set", "tests", "faults injected", "survived", "fired in runs ending in a clear error (runs)",
              "units/steps recomputed",
              "data lost", "compared, all equal", "refusals / recoveries", "bad inputs", "test wall s", "seeds",
              "machine"]
    body = []
    for suite in (s for s in SUITES if any(r["suite"] == s for r in rows)):
        t = totals(rows, suite)
        rs = [r for r in rows if r["suite"] == suite]
        seeds = sorted({r["seed"] for r in rs})
        body.append([SUITES[suite], _n(t["tests"]), _n(t["faults"]), _n(t["survived"]),
                     f"{_n(t['in_errors'])} ({_n(t['clear_errors'])})",
                     _n(t["recomputed"]), _n(t["lost"]),
                     f"{_n(t['objects'])} cache objects, {_n(t['bytes'])} bytes, {_n(t['tensors'])} tensors",
                     _n(t["refusals"]), _n(t["inputs"]), _n(t["wall_s"]), ", ".join(str(s) for s in seeds),
                     ", ".join(sorted({_key(r, keys) for r in rs}))])
    legend = "; ".join(f"**{k}**: {v}" for k, v in keys.items())
    return "\n".join([*_table(header, body), "", f"Machines: {legend}."])


def render_blocks(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Block name → generated markdown, for docs/reliability.md."""
    keys = machines(rows)
    return {"summary": render_summary(rows, keys), "kills": render_kills(rows, keys),
            "refusals": render_refusals(rows, keys), "store": render_store(rows, keys),
            "inputs": render_inputs(rows, keys)}


def _count(n: int, noun: str) -> str:
    return f"{_n(n)} {noun}{'' if n == 1 else 's'}"


def render_readme(rows: list[dict[str, Any]]) -> str:
    """The README's short block: per set, the measured totals, where the tables are."""
    keys = machines(rows)
    lines = []
    for suite in (s for s in SUITES if any(r["suite"] == s for r in rows)):
        t = totals(rows, suite)
        seeds = sorted({r["seed"] for r in rows if r["suite"] == suite})
        seed_text = ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)
        lines.append(f"- **{SUITES[suite]}** ({_count(t['tests'], 'test')}, {seed_text}): "
                     f"{_count(t['faults'], 'fault')} injected: {_n(t['survived'])} survived (retried, resumed or "
                     f"taken over), {_n(t['in_errors'])} fired in {_count(t['clear_errors'], 'run')} made to outlast "
                     f"every retry, each ending in a clear error; {_n(t['recomputed'])} units/steps recomputed; data "
                     f"lost: {_n(t['lost'])}; compared equal: {_n(t['objects'])} cache objects, {_n(t['bytes'])} "
                     f"bytes, {_n(t['tensors'])} weight tensors; {_count(t['refusals'], 'refused start')} or "
                     f"recoveries; {_count(t['inputs'], 'bad input')}, each a named error or a recorded skip.")
    machine = "; ".join(f"{k}: {v}" for k, v in keys.items())
    return "\n".join([f"Counted by the fault suite's own tests ({machine}); generated by `python -m "
                      "tests.faults.report` from `docs/reliability_figures.jsonl`, tables in "
                      "[docs/reliability.md](docs/reliability.md):", "", *lines])


def replace_between(text: str, begin: str, end: str, body: str, where: str) -> str:
    """``text`` with what lies between the ``begin`` and ``end`` lines replaced by ``body``.

    Raises:
        ValueError: naming ``where`` when a marker is missing, repeated or out of order.
    """
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{where}: expected one {begin!r} followed by one {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def apply_page(text: str, blocks: dict[str, str], where: str = "docs/reliability.md") -> str:
    """The page with every generated block rewritten."""
    for name, body in blocks.items():
        text = replace_between(text, f"<!-- figures:{name}:begin -->", f"<!-- figures:{name}:end -->", body, where)
    return text


def has_readme_markers(text: str) -> bool:
    """Whether the README has its reliability block's markers yet."""
    return README_BEGIN in text and README_END in text


def rendered(rows: list[dict[str, Any]], page: str, readme: str) -> tuple[str, str]:
    """(page, README) as the generator writes them for ``rows``; the README unchanged without its markers."""
    page = apply_page(page, render_blocks(rows))
    if has_readme_markers(readme):
        readme = replace_between(readme, README_BEGIN, README_END, render_readme(rows), "README.md")
    return page, readme


def main(argv: list[str]) -> int:
    """Merge the row files named in ``argv`` (if any), then rewrite the docs, or with ``--check`` compare them."""
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    rows = read_rows(ROWS) if ROWS.exists() else []
    if paths:
        rows = merge(rows, [r for p in paths for r in read_rows(p)])
        if not check:
            ROWS.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    page, readme = PAGE.read_text(), README.read_text()
    new_page, new_readme = rendered(rows, page, readme)
    if check:
        stale = [n for n, old, new in (("docs/reliability.md", page, new_page), ("README.md", readme, new_readme))
                 if old != new]
        if stale:
            log.error("not up to date with %s: %s (run python -m tests.faults.report)", ROWS.name, ", ".join(stale))
        return 1 if stale else 0
    PAGE.write_text(new_page)
    if has_readme_markers(readme):
        README.write_text(new_readme)
    else:
        log.warning("README.md has no %s / %s markers: left alone", README_BEGIN, README_END)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(sys.argv[1:]))
