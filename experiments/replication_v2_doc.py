"""The v2 tables of docs/replication.md, generated from the raw rows (experiments/replicate_v2.py ``--doc``).

Each table stands between ``<!-- v2:NAME -->`` and ``<!-- /v2:NAME -->`` in the document; :func:`fill` rewrites
what is between the markers with :func:`blocks`' output, so a table in the document is the script's output on the
committed rows or a test fails (tests/experiments/test_replication_v2_doc.py).
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from experiments.replication_v2_table import (
    LABELS,
    curve_table,
    every_model_table,
    model_means,
    models_table,
    own_cost_note,
    summary,
    variant_groups,
    variant_table,
)

Rows = dict[str, dict[str, Any]]
CODECS = ("int8", "fp8")
MARKER = re.compile(r"(<!-- v2:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /v2:(?P=name) -->)", re.S)


def codec_table(rows: Rows, lossless: str, protocols: tuple[str, ...] = ("knn", "linear", "finetune")) -> str:
    """TEC from each codec's cache against the lossless variant ``lossless`` (``tec_b64_e16``): per protocol the
    variant's mean over model seeds and its difference from lossless with the spread it is judged against (the
    larger of the two variants' ranges over model means, as the saturation criterion does). A codec stays inside
    the seed spread when, on every protocol, the difference is smaller than the spread."""
    head = ["codec", "seeds", *(LABELS[p] for p in protocols), *(f"Δ {LABELS[p]} (spread)" for p in protocols),
            "inside the seed spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = variant_groups(rows)
    base = {p: model_means(rows, groups.get(lossless, []), p) for p in protocols}
    for codec in ("float16", *CODECS):
        variant = lossless if codec == "float16" else lossless.replace("tec_", f"tec_{codec}_", 1)
        means = {p: model_means(rows, groups.get(variant, []), p) for p in protocols}
        if not any(means.values()):
            continue
        deltas, outside = [], []
        for p in protocols:
            a, b = base[p], means[p]
            if codec == "float16" or not a or not b:
                deltas.append("—")
                continue
            d, spread = statistics.fmean(b) - statistics.fmean(a), max(max(a) - min(a), max(b) - min(b))
            deltas.append(f"{d:+.4f} ({spread:.4f})")
            if abs(d) >= spread:
                outside.append(LABELS[p])
        n = max(len(v) for v in means.values())
        verdict = "—" if codec == "float16" else ("yes" if not outside else "no: " + ", ".join(outside))
        if codec != "float16" and n < 2:
            verdict = "— (one seed)"
        lines.append(f"| {codec} | {n} | " + " | ".join(summary(means[p]) for p in protocols) + " | "
                     + " | ".join(deltas) + f" | {verdict} |")
    return "\n".join(lines)


def blocks(rows: Rows, base_epochs: list[int]) -> dict[str, str]:
    """The document's tables by marker name: ``curve`` (random init and the saturation bases), ``doublings``,
    ``compare`` (TEC against MAE for the same epochs, over model seeds, with TEC's own share of the cost),
    ``attention`` (seed 0 with the attention target on and off), ``codecs``, and ``models`` (every model under
    every protocol with the machine it ran on, as ``--table`` prints it)."""
    curve = ["random_init", *(f"mae_e{e}_s0" for e in sorted(base_epochs))]
    out = {"curve": models_table(rows, curve, ("knn", "linear", "finetune")),
           "doublings": curve_table(rows, base_epochs), "models": every_model_table(rows)}
    tec = sorted({(r["base_epochs"], r["tec_epochs"]) for r in rows.values() if r.get("kind") == "model"
                  and r.get("model_kind") == "tec"})
    for e, t in tec[-1:]:  # the comparison at the last base TEC started from
        lossless = f"tec_b{e}_e{t}"
        out["compare"] = (variant_table(rows, [lossless, f"mae_e{e + t}"]) + "\n\n"
                          + own_cost_note(rows, lossless))
        out["attention"] = models_table(rows, [f"{lossless}_s0", f"tec_noatt_b{e}_e{t}_s0"],
                                        ("knn", "linear", "finetune"))
        out["codecs"] = codec_table(rows, lossless)
    return out


def fill(text: str, tables: dict[str, str], where: str = "the document") -> str:
    """``text`` with every marked block's body replaced by ``tables[name]``; an unknown name is an error naming it."""
    def body(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in tables:
            raise ValueError(f"{where}: <!-- v2:{name} --> names no table; expected one of {sorted(tables)}")
        return f"{m.group(1)}{tables[name]}\n{m.group(4)}"
    return MARKER.sub(body, text)


def marked(text: str) -> dict[str, str]:
    """The bodies of ``text``'s marked blocks by name (what :func:`fill` would replace)."""
    return {m["name"]: m["body"].rstrip("\n") for m in MARKER.finditer(text)}
