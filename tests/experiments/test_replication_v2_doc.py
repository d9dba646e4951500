"""experiments/replication_v2_doc.py: the v2 tables of docs/replication.md are the script's output on the rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.replicate_v2 import BASE_EPOCHS, Rows
from experiments.replication_v2_doc import blocks, codec_table, fill, marked

ROOT = Path(__file__).resolve().parents[2]


def _rows(means: dict[str, list[float]]) -> dict[str, dict]:
    """Model rows of the named variants, one per seed, each with one k-NN and one fine-tune score."""
    rows: dict[str, dict] = {}
    for variant, values in means.items():
        for s, v in enumerate(values):
            name = f"{variant}_s{s}"
            rows[f"model/{name}"] = {"kind": "model", "model": name, "model_kind": "tec", "base_epochs": 64,
                                     "tec_epochs": 16, "seed": s, "macs": {}, "seconds": None}
            for protocol, top1 in (("knn", v), ("finetune", v - 0.1)):
                rows[f"eval/{name}/{protocol}/{s}"] = {"kind": "eval", "model": name, "protocol": protocol,
                                                       "seed": s, "top1": top1}
    return rows


def test_the_documents_v2_tables_are_the_scripts_output_on_the_committed_rows():
    doc = (ROOT / "docs/replication.md").read_text()
    rows = Rows(str(ROOT / "docs/replication_v2_results.jsonl")).rows
    tables = blocks(rows, list(BASE_EPOCHS))
    found = marked(doc)
    assert set(found) == set(tables), "docs/replication.md: the v2 tables it marks are not the ones the script makes"
    for name, body in found.items():
        assert body == tables[name], (f"docs/replication.md's v2:{name} table is not the output of "
                                      "`python experiments/replicate_v2.py --table --doc docs/replication.md`")


def test_a_codec_is_inside_the_seed_spread_only_when_every_protocol_differs_by_less_than_it():
    # lossless k-NN 0.70-0.72 (range 0.02); int8 0.706-0.716: +0.001 inside; fp8 0.66-0.67: -0.045 outside
    rows = _rows({"tec_b64_e16": [0.70, 0.72, 0.71], "tec_int8_b64_e16": [0.706, 0.716],
                  "tec_fp8_b64_e16": [0.66, 0.67]})
    lines = codec_table(rows, "tec_b64_e16", ("knn", "finetune")).splitlines()
    assert lines[2] == "| float16 | 3 | 0.7100 ± 0.0100 (3) | 0.6100 ± 0.0100 (3) | — | — | — |"
    assert lines[3] == ("| int8 | 2 | 0.7110 ± 0.0050 (2) | 0.6110 ± 0.0050 (2) | +0.0010 (0.0200) | "
                        "+0.0010 (0.0200) | yes |")
    assert lines[4].endswith("| -0.0450 (0.0200) | -0.0450 (0.0200) | no: k-NN, fine-tune |")
    one = codec_table(_rows({"tec_b64_e16": [0.70, 0.72], "tec_fp8_b64_e16": [0.71]}), "tec_b64_e16", ("knn",))
    assert one.splitlines()[-1].endswith("| — (one seed) |")


def test_fill_rewrites_only_the_marked_bodies_and_names_an_unknown_table():
    text = "intro\n<!-- v2:curve -->\nold\ntable\n<!-- /v2:curve -->\nafter\n"
    assert fill(text, {"curve": "| new |"}) == "intro\n<!-- v2:curve -->\n| new |\n<!-- /v2:curve -->\nafter\n"
    assert marked(fill(text, {"curve": "| new |"})) == {"curve": "| new |"}
    with pytest.raises(ValueError, match=r"README.md: <!-- v2:curve --> names no table; expected one of \['x'\]"):
        fill(text, {"x": ""}, "README.md")
