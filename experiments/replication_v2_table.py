"""Replication v2's reading of its raw rows (experiments/replicate_v2.py): the saturation criterion and the README's
Markdown table, both computed from the rows only (no number is typed in)."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

PROTOCOLS = ("knn", "linear", "finetune", "peft_prompt", "peft_both")
LABELS = {"knn": "k-NN", "linear": "linear", "finetune": "fine-tune", "peft_prompt": "PEFT prompt",
          "peft_both": "PEFT both"}


def scores(rows: dict[str, dict[str, Any]], model: str, protocol: str) -> list[float]:
    """Top-1 of every finished evaluation of ``model`` under ``protocol`` (one per seed)."""
    return [r["top1"] for r in rows.values() if r.get("kind") == "eval" and r["model"] == model
            and r["protocol"] == protocol and r["top1"] is not None]


def summary(values: list[float]) -> str:
    """``0.8123`` for one value, ``0.8123 ± 0.0040 (3)`` (mean ± half the range, seeds) for several, ``—`` for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    half = (max(values) - min(values)) / 2
    return f"{statistics.fmean(values):.4f} ± {half:.4f} ({len(values)})"


def saturated_epochs(rows: dict[str, dict[str, Any]], base_epochs: list[int],
                     protocol: str = "finetune") -> int | None:
    """The first base epochs E of the curve whose doubling gains less than the seed spread under ``protocol``.

    Gain: mean top-1 at 2E minus mean at E (seed 0 base, fine-tuning seeds). Spread: the larger of the two
    points' ranges over their seeds. None while no doubling qualifies (or the points lack two seeds each).
    """
    curve = sorted(base_epochs)
    for e, twice in itertools.pairwise(curve):
        if twice != 2 * e:
            continue
        a, b = scores(rows, f"mae_e{e}_s0", protocol), scores(rows, f"mae_e{twice}_s0", protocol)
        if len(a) < 2 or len(b) < 2:
            return None
        spread = max(max(a) - min(a), max(b) - min(b))
        if statistics.fmean(b) - statistics.fmean(a) < spread:
            return e
    return None


def curve_table(rows: dict[str, dict[str, Any]], base_epochs: list[int], protocol: str = "finetune") -> str:
    """The saturation curve under ``protocol``: each measured E's mean top-1 and seed range, and each doubling's
    gain against the spread :func:`saturated_epochs` compares it with."""
    lines = ["| base ep | fine-tune | range | gain over E/2 | spread | doubling saturates |",
             "|---|---|---|---|---|---|"]
    prev: list[float] = []
    for e in sorted(base_epochs):
        now = scores(rows, f"mae_e{e}_s0", protocol)
        if not now:
            prev = []
            continue
        gain = spread = sat = "—"
        if len(prev) > 1 and len(now) > 1:
            g, sp = statistics.fmean(now) - statistics.fmean(prev), max(max(prev) - min(prev), max(now) - min(now))
            gain, spread, sat = f"{g:+.4f}", f"{sp:.4f}", ("yes" if g < sp else "no")
        lines.append(f"| {e} | {statistics.fmean(now):.4f} ({len(now)}) | {max(now) - min(now):.4f} | {gain} | "
                     f"{spread} | {sat} |")
        prev = now
    return "\n".join(lines)


def variant_of(model: str) -> str:
    """A model's variant: its name without the ``_s<seed>`` suffix (``tec_b32_e16_s2`` -> ``tec_b32_e16``)."""
    stem, _, seed = model.rpartition("_s")
    return stem if stem and seed.isdigit() else model


def variant_groups(rows: dict[str, dict[str, Any]], kind: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The model rows of each variant (of model kind ``kind`` when given), in the order the first row was written."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows.values():
        if row.get("kind") == "model" and kind in (None, row.get("model_kind")):
            groups.setdefault(variant_of(row["model"]), []).append(row)
    return groups


def model_means(rows: dict[str, dict[str, Any]], models: list[dict[str, Any]], protocol: str) -> list[float]:
    """Each of ``models``' mean top-1 under ``protocol`` over its fine-tuning seeds (models not yet scored left out)."""
    return [statistics.fmean(v) for v in (scores(rows, m["model"], protocol) for m in models) if v]


def variant_table(rows: dict[str, dict[str, Any]], variants: list[str] | None = None) -> str:
    """The variants with more than one model seed (the equal-budget comparison): per protocol, each model's mean
    over its fine-tuning seeds, summarised over the models (mean ± half the range, seeds); mean TMAC and seconds.
    ``variants``: only these, in this order (default: every variant, in the order its first row was written)."""
    groups = variant_groups(rows)
    header = "| variant | base ep | TEC ep | seeds | k-NN | linear | fine-tune | PEFT prompt | PEFT both | TMAC | s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name in groups if variants is None else [v for v in variants if v in groups]:
        models = groups[name]
        if len(models) < 2:
            continue
        cells = [summary(model_means(rows, models, p)) for p in PROTOCOLS]
        costs = [cost_cells(rows, m) for m in models]
        tmac = [float(t) for t, _ in costs if t != "—"]
        secs = [float(x) for _, x in costs if x != "—"]
        first = models[0]
        tec_ep = str(first["tec_epochs"]) if first["tec_epochs"] else "—"
        lines.append(f"| {name} | {first['base_epochs']} | {tec_ep} | {','.join(str(m['seed']) for m in models)} | "
                     + " | ".join(cells) + f" | {f'{statistics.fmean(tmac):.1f}' if tmac else '—'} | "
                     f"{f'{statistics.fmean(secs):.0f}' if secs else '—'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def base_of(rows: dict[str, dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """The model row of the seed-0 pixel-MAE base a TEC row started from (None: not a TEC row, or not recorded)."""
    if row.get("model_kind") != "tec":
        return None
    return rows.get(f"model/mae_e{row['base_epochs']}_s0")


def cost_cells(rows: dict[str, dict[str, Any]], row: dict[str, Any]) -> tuple[str, str]:
    """(TMAC, seconds) cells of a model: its whole cost from raw pixels. A TEC row's MACs already count its base's
    pre-training (the ledger's ``pretrain`` entry); its seconds are its own extraction and training, so the base's
    measured seconds are added ("—" when the base was not timed as one run)."""
    macs = sum(row.get("macs", {}).values())
    seconds = row.get("seconds")
    if row.get("model_kind") == "tec" and seconds:
        base = base_of(rows, row)
        seconds = seconds + base["seconds"] if base and base.get("seconds") else None
    return (f"{macs / 1e12:.1f}" if macs else "—"), (f"{seconds:.0f}" if seconds else "—")


def own_cost_note(rows: dict[str, dict[str, Any]], variant: str | None = None) -> str:
    """One line per TEC variant (only ``variant`` when given): its base's share of its cost, and TEC's own
    (extraction + training), the mean over the variant's model seeds."""
    groups = variant_groups(rows, "tec")
    lines = []
    for name, mine in groups.items() if variant is None else [(variant, groups.get(variant, []))]:
        if not mine:
            continue
        base = base_of(rows, mine[0])
        own_macs = statistics.fmean(sum(v for k, v in r["macs"].items() if k != "pretrain") for r in mine)
        own_s = [r["seconds"] for r in mine if r.get("seconds")]
        base_cost = (f"{sum(base['macs'].values()) / 1e12:.1f} TMAC, "
                     + (f"{base['seconds']:.0f} s" if base.get("seconds") else "not timed")) if base else "not recorded"
        lines.append(f"{name}: TEC's TMAC and s include its base's pre-training (mae_e{mine[0]['base_epochs']}_s0: "
                     f"{base_cost}); TEC's own extraction + training: {own_macs / 1e12:.1f} TMAC, "
                     + (f"{statistics.fmean(own_s):.0f} s" if own_s else "not timed") + f" (mean of {len(mine)}).")
    return "\n".join(lines)


def sizing_table(rows: dict[str, dict[str, Any]]) -> str:
    """The fine-tuning recipes tried (``sizing`` rows): top-1 of the random init and of the base, and the gap."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows.values():
        if row.get("kind") == "sizing":
            by.setdefault(row["recipe"], {})[row["model"]] = row
    lines = ["| recipe | fields over the config's finetune section | labelled | random init | base | gap | s |",
             "|---|---|---|---|---|---|---|"]
    for name, models in by.items():
        rnd = models.get("random_init")
        base = next((r for m, r in models.items() if m != "random_init"), None)
        first = rnd or base
        gap = f"{base['top1'] - rnd['top1']:+.4f}" if rnd and base else "—"
        secs = sum(r["seconds"] for r in models.values())
        fields = ", ".join(f"{k}={v}" for k, v in first["fields"].items()) or "—"
        lines.append(f"| {name} | {fields} | {first['n_train']} | {rnd['top1'] if rnd else float('nan'):.4f} | "
                     f"{base['top1'] if base else float('nan'):.4f} ({base['model'] if base else '—'}) | {gap} | "
                     f"{secs:.0f} |")
    return "\n".join(lines)


def models_table(rows: dict[str, dict[str, Any]], names: list[str], protocols: tuple[str, ...] = PROTOCOLS,
                 tec_column: bool | None = None, machine: bool = False) -> str:
    """One line per model of ``names`` that has a row: its top-1 under ``protocols`` (mean ± half the range over
    its fine-tuning seeds), TMAC and seconds from raw pixels (:func:`cost_cells`), and its machine when ``machine``.
    ``tec_column``: show TEC's epochs (default: when a listed model is a TEC model)."""
    found = [rows[f"model/{n}"] for n in names if f"model/{n}" in rows]
    tec = any(r["tec_epochs"] for r in found) if tec_column is None else tec_column
    head = ["model", "base ep", *(["TEC ep"] if tec else []), *(LABELS[p] for p in protocols), "TMAC", "s",
            *(["machine"] if machine else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in found:
        cells = [row["model"], str(row["base_epochs"])]
        if tec:
            cells.append(str(row["tec_epochs"]) if row["tec_epochs"] else "—")
        cells += [summary(scores(rows, row["model"], p)) for p in protocols]
        cells += [*cost_cells(rows, row), *([row["machine"]] if machine else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def every_model_table(rows: dict[str, dict[str, Any]]) -> str:
    """Every model (random init, MAE, TEC; by epochs, then name) under every protocol, with its machine."""
    order = {"random": 0, "mae": 1, "tec": 2}
    models = sorted((r for r in rows.values() if r.get("kind") == "model"), key=lambda r: (
        order.get(r.get("model_kind", ""), 3), r["base_epochs"], r["tec_epochs"], r["model"]))
    return models_table(rows, [r["model"] for r in models], tec_column=True, machine=True)


def table(rows: dict[str, dict[str, Any]], base_epochs: list[int]) -> str:
    """Every model (random init, MAE, TEC; by epochs) under every protocol with its cost and machine, the variants
    over model seeds, the saturation curve and the sizing rows."""
    lines = every_model_table(rows).splitlines()
    compared = variant_table(rows)
    if compared:
        lines = ["Variants over model seeds (each model's fine-tuning mean, then mean ± half the range over the "
                 "models):", "", compared, "", "Every model:", "", *lines]
    note = own_cost_note(rows)
    if note:
        lines += ["", note]
    e_star = saturated_epochs(rows, base_epochs)
    lines += ["", "Saturation curve (seed-0 base, fine-tuning seeds):", "", curve_table(rows, base_epochs), "",
              f"Saturated base (first E whose doubling gains less than the fine-tuning seed spread): "
              f"{'E = ' + str(e_star) if e_star else 'not reached on ' + ','.join(map(str, base_epochs))}."]
    compared_at = sorted({r["base_epochs"] for r in rows.values() if r.get("kind") == "model"
                          and r.get("model_kind") == "tec"})
    if compared_at:
        marks = ", ".join(f"E = {e}" + ("" if e == e_star else " (not saturated)") for e in compared_at)
        lines.append(f"TEC models start from the base at {marks}.")
    if any(r.get("kind") == "sizing" for r in rows.values()):
        lines += ["", "Fine-tuning recipes tried (seed 0):", "", sizing_table(rows)]
    return "\n".join(lines)
