"""experiments/replication_v2_table.py: the saturation criterion and the table read only the raw rows."""

from __future__ import annotations

from experiments.replication_v2_table import (
    curve_table,
    saturated_epochs,
    sizing_table,
    summary,
    table,
    variant_of,
    variant_table,
)


def _eval(model: str, protocol: str, seed: int | None, top1: float) -> tuple[str, dict]:
    return f"eval/{model}/{protocol}/{seed}", {"kind": "eval", "model": model, "protocol": protocol, "seed": seed,
                                               "top1": top1}


def _model(name: str, base_epochs: int) -> tuple[str, dict]:
    seed = name.rpartition("_s")[2]
    return f"model/{name}", {"kind": "model", "model": name, "base_epochs": base_epochs, "tec_epochs": 0,
                             "seed": int(seed) if seed.isdigit() else 0,
                             "macs": {"pretrain": 3e12}, "seconds": 100.0, "machine": "2-core test VM"}


def _curve(points: dict[int, list[float]]) -> dict[str, dict]:
    rows = dict(_model(f"mae_e{e}_s0", e) for e in points)
    for e, values in points.items():
        rows.update(_eval(f"mae_e{e}_s0", "finetune", s, v) for s, v in enumerate(values))
    return rows


def test_the_first_doubling_that_gains_less_than_the_seed_spread_is_the_saturated_base():
    # 8 -> 16 gains 0.10 (spread 0.02): not saturated; 16 -> 32 gains 0.01 < spread 0.02: E = 16
    rows = _curve({8: [0.60, 0.62], 16: [0.70, 0.72], 32: [0.71, 0.73], 64: [0.75, 0.75]})
    assert saturated_epochs(rows, [8, 16, 32, 64]) == 16
    # every doubling still pays: not reached
    rows = _curve({8: [0.60, 0.61], 16: [0.70, 0.71], 32: [0.80, 0.81]})
    assert saturated_epochs(rows, [8, 16, 32]) is None
    # a point with one seed has no spread yet: undecided
    rows = _curve({8: [0.60], 16: [0.60, 0.61]})
    assert saturated_epochs(rows, [8, 16]) is None


def test_summary_and_table_are_computed_from_the_rows():
    assert summary([]) == "—" and summary([0.5]) == "0.5000"
    assert summary([0.70, 0.72, 0.74]) == "0.7200 ± 0.0200 (3)"
    rows = _curve({8: [0.60, 0.62], 16: [0.61, 0.62]})
    rows.update([_eval("mae_e8_s0", "knn", None, 0.55)])
    text = table(rows, [8, 16])
    assert "| mae_e8_s0 | 8 | — | 0.5500 | — | 0.6100 ± 0.0100 (2) | — | — | 3.0 | 100 | 2-core test VM |" in text
    assert "E = 8." in text


def test_sizing_table_reports_the_gap_between_base_and_random_init():
    fields = {"epochs": 10}
    rows = {f"sizing/r/{m}": {"kind": "sizing", "recipe": "r", "fields": fields, "model": m, "top1": t,
                              "n_train": 1000, "seconds": 50.0} for m, t in (("random_init", 0.5), ("mae_e32_s0", 0.6))}
    last = sizing_table(rows).splitlines()[-1]
    assert last == "| r | epochs=10 | 1000 | 0.5000 | 0.6000 (mae_e32_s0) | +0.1000 | 100 |"


def test_variants_pool_model_seeds_after_averaging_each_models_fine_tuning_seeds():
    assert variant_of("tec_b32_e16_s2") == "tec_b32_e16" and variant_of("random_init") == "random_init"
    assert variant_of("tec_noatt_b32_e16_s0") == "tec_noatt_b32_e16"
    rows = dict(_model(f"tec_b32_e16_s{s}", 32) for s in range(3))
    rows.update(_model("mae_e8_s0", 8) for _ in range(1))
    rows.update([_eval("tec_b32_e16_s0", "finetune", 0, 0.70), _eval("tec_b32_e16_s0", "finetune", 1, 0.72),
                 _eval("tec_b32_e16_s1", "finetune", 1, 0.75), _eval("tec_b32_e16_s2", "finetune", 2, 0.73),
                 _eval("mae_e8_s0", "finetune", 0, 0.50)])
    text = variant_table(rows)
    # model means 0.71, 0.75, 0.73: mean 0.73, half range 0.02; a single-seed variant is not listed
    assert "| tec_b32_e16 | 32 | — | 0,1,2 | — | — | 0.7300 ± 0.0200 (3) | — | — | 3.0 | 100 |" in text
    assert "mae_e8" not in text
    assert table(rows, [8]).startswith("Variants over model seeds")


def test_curve_table_shows_each_doublings_gain_against_the_spread_and_marks_an_unsaturated_comparison():
    rows = _curve({8: [0.60, 0.62], 16: [0.70, 0.72], 32: [0.71, 0.73]})
    text = curve_table(rows, [8, 16, 32])
    assert "| 16 | 0.7100 (2) | 0.0200 | +0.1000 | 0.0200 | no |" in text
    assert "| 32 | 0.7200 (2) | 0.0200 | +0.0100 | 0.0200 | yes |" in text
    name, tec = _model("tec_b32_e16_s0", 32)
    rows[name] = {**tec, "model_kind": "tec", "tec_epochs": 16}
    assert "TEC models start from the base at E = 32 (not saturated)." in table(rows, [8, 16, 32])
    assert "TEC models start from the base at E = 16." not in table(rows, [8, 16, 32])
    rows[name]["base_epochs"] = 16
    assert "TEC models start from the base at E = 16." in table(rows, [8, 16, 32])


def test_a_tec_rows_cost_counts_its_base_and_the_note_gives_tecs_own_share():
    rows = dict([_model("mae_e32_s0", 32)])  # 3 TMAC, 100 s
    name, tec = _model("tec_b32_e16_s0", 32)
    rows[name] = {**tec, "model_kind": "tec", "tec_epochs": 16, "seconds": 50.0,
                  "macs": {"pretrain": 3e12, "extract": 0.5e12, "train": 1.5e12}}
    text = table(rows, [32])
    assert "| tec_b32_e16_s0 | 32 | 16 | — | — | — | — | — | 5.0 | 150 | 2-core test VM |" in text
    assert ("TEC's TMAC and s include its base's pre-training (mae_e32_s0: 3.0 TMAC, 100 s); TEC's own extraction + "
            "training: 2.0 TMAC, 50 s (mean of 1).") in text
    rows["model/mae_e32_s0"]["seconds"] = None  # a base not timed as one run: no total seconds for TEC
    assert "| 5.0 | — | 2-core test VM |" in table(rows, [32])
