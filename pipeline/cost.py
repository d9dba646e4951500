"""What a target cache cost and saved (from its ledger), and what one would cost on paper (:func:`project`).

Units: MACs (multiply-accumulates); **FLOPs = 2×MACs** (docs/method.md#11-flops-convention). Every MAC field ends
in ``_macs``; the text output prints both, e.g. ``17.56 GMAC (35.13 GFLOP)``.

Break-even: extraction runs the base model once per stored view (N·V forwards); a cached training run avoids one
base forward per view it serves (N per epoch). At equal data size the cache pays back once the runs' epochs add
up to V ("runs×epochs needed to break even = V"), i.e. once views served ≥ views extracted.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from infra import storage
from pipeline.flops import UNIT, base_macs_per_view, format_macs, tec_step_macs
from pipeline.ledger import read_ledger
from stages.cache import raw_bytes_per_view
from stages.cache.codecs import CODECS, LOSSLESS, check_codec, stored_bytes_per_view
from tec_model.archs import num_patches, vit_kwargs

log = logging.getLogger(__name__)

STORED_OVER_RAW = 0.82  # measured stored/raw bytes of the float16 codec only (docs/benchmarks.md#extraction)


def cache_costs(cache_url: str) -> dict[str, Any]:
    """One cache's ledger summed up (MACs; FLOPs = 2×MACs).

    Returns:
        A dict: extraction spent (``spent_base_macs``, ``extract_device_seconds`` by device kind,
        ``bytes_stored``), runs (``runs``, ``cache_runs``, ``views_served`` by cache runs, ``base_macs_avoided``,
        ``train_macs``, ``bytes_read``; ``object_store_bytes`` / ``local_cache_bytes`` summed over the runs that
        measured them, ``network_runs`` of them), ``net_saving_macs`` (avoided − spent), ``bytes_read_per_avoided_mac``,
        ``break_even_run_epochs`` (= V), ``run_epochs_served`` (cache views served / images) and
        ``break_even_reached`` (None without an extraction row).
    """
    ext, runs = read_ledger(cache_url)
    e, r = ext.to_pylist(), runs.to_pylist()
    cached = [row for row in r if row["target_source"] == "cache"]
    device: dict[str, float] = {}
    for row in e:
        for kind, seconds in json.loads(row["device_seconds_json"]).items():
            device[kind] = device.get(kind, 0.0) + seconds
    images = sum(row["images"] for row in e)
    views_extracted = sum(row["views"] for row in e)
    spent = sum(row["base_macs_total"] for row in e)
    avoided = sum(row["base_macs_avoided"] for row in cached)
    served = sum(row["views_served"] for row in cached)
    bytes_read = sum(row["bytes_read"] for row in cached)
    measured = [row for row in cached if row.get("object_store_bytes") is not None]
    return {
        "cache_url": cache_url, "cache_key": e[-1]["cache_key"] if e else "", "unit": UNIT,
        "extractions": len(e), "images_extracted": images, "views_extracted": views_extracted,
        "views_per_image": e[-1]["views_per_image"] if e else 0,
        "spent_base_macs": spent, "extract_device_seconds": device,
        "extract_wall_seconds": sum(row["wall_seconds"] for row in e),
        "bytes_stored": e[-1]["cache_stored_bytes"] if e else 0,
        "runs": len(r), "cache_runs": len(cached), "views_served": served, "base_macs_avoided": avoided,
        "train_macs": sum(row["train_macs"] for row in r), "bytes_read": bytes_read,
        "object_store_bytes": sum(row["object_store_bytes"] for row in measured),
        "local_cache_bytes": sum(row["local_cache_bytes"] or 0 for row in measured), "network_runs": len(measured),
        "net_saving_macs": avoided - spent,
        "bytes_read_per_avoided_mac": bytes_read / avoided if avoided else None,
        "break_even_run_epochs": e[-1]["views_per_image"] if e else None,
        "run_epochs_served": served / images if images else None,
        "break_even_reached": (served >= views_extracted and avoided >= spent) if e else None,
    }


def cost_rows(cache_urls: str | Sequence[str]) -> list[dict[str, Any]]:
    """:func:`cache_costs` of each cache (MACs; FLOPs = 2×MACs)."""
    urls = [cache_urls] if isinstance(cache_urls, str) else list(cache_urls)
    return [cache_costs(url) for url in urls]


def _bytes(n: float) -> str:
    """``3.86 TB``-style decimal byte counts."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}B"
    return f"{n:.0f} B"


def _scale(values: list[float]) -> tuple[float, str]:
    top = max((abs(v) for v in values), default=0.0)
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if top >= scale:
            return scale, prefix
    return 1.0, ""


def format_cost_rows(rows: list[dict[str, Any]]) -> str:
    """The cost table as text, one block per cache."""
    out = [f"base-model cost per cache; unit: {UNIT}"]
    for c in rows:
        device = ", ".join(f"{k} {s:.1f}s" for k, s in sorted(c["extract_device_seconds"].items())) or "none"
        per = c["bytes_read_per_avoided_mac"]
        reached = {None: "no extraction recorded", True: "reached", False: "not yet"}[c["break_even_reached"]]
        served = c["run_epochs_served"]
        out += [
            f"cache {c['cache_url']}  key {c['cache_key'][:12] or '-'}",
            f"  extraction spent   {format_macs(c['spent_base_macs'])} over {c['views_extracted']} views "
            f"({c['images_extracted']} images × V={c['views_per_image']}) in {c['extractions']} run(s); "
            f"device-seconds {device}; stored {_bytes(c['bytes_stored'])}",
            f"  runs               {c['runs']} ({c['cache_runs']} from the cache); served {c['views_served']} views; "
            f"avoided {format_macs(c['base_macs_avoided'])}; own training {format_macs(c['train_macs'])}",
            f"  net saving         {format_macs(c['net_saving_macs'])} (avoided − spent)",
            f"  bytes read         {_bytes(c['bytes_read'])}; "
            + (f"{per * 1e9:.0f} B per GMAC avoided" if per is not None else "no MACs avoided yet"),
            f"  network            object store {_bytes(c['object_store_bytes'])}, local cache "
            f"{_bytes(c['local_cache_bytes'])} ({c['network_runs']} of {c['cache_runs']} cache run(s) measured)",
            f"  break-even         runs×epochs needed = V = {c['break_even_run_epochs']}; served so far "
            + (f"{served:.2f} run-epochs" if served is not None else "-") + f": {reached}",
        ]
    return "\n".join(out)


def cost_table(cache_urls: str | Sequence[str]) -> str:
    """The cost table of one or more caches as text (see :func:`cost_rows` for the numbers)."""
    return format_cost_rows(cost_rows(cache_urls))


def write_cost_chart(cache_url: str, path: str) -> str:
    """PNG: cumulative base MACs spent by extraction vs avoided by the cache's runs, in ledger order.

    Args:
        cache_url: the cache.
        path: where to write the PNG (local path or fsspec URL).

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ext, runs = read_ledger(cache_url)
    events = [(row["timestamp"], "extract", row["base_macs_total"], 0) for row in ext.to_pylist()]
    events += [(row["timestamp"], row["run_name"], 0, row["base_macs_avoided"]) for row in runs.to_pylist()]
    events.sort()
    spent, avoided, labels = [0], [0], ["start"]
    for _, label, ds, da in events:
        spent.append(spent[-1] + ds)
        avoided.append(avoided[-1] + da)
        labels.append(label)
    scale, prefix = _scale(spent + avoided)
    fig = Figure(figsize=(max(6.0, 0.6 * len(labels)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = list(range(len(labels)))
    ax.step(x, [v / scale for v in spent], where="post", marker="o", label="spent (extraction)")
    ax.step(x, [v / scale for v in avoided], where="post", marker="s", label="avoided (cached runs)")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"cumulative base-model {prefix}MAC (FLOPs = 2×MACs)")
    ax.set_xlabel("ledger rows in time order")
    ax.set_title(f"base-model MACs spent vs avoided: {cache_url}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    storage.write_bytes(path, buf.getvalue())
    log.info("cost chart of %s -> %s", cache_url, path)
    return path


def bytes_per_view(num_patches: int, embed_dim: int, num_heads: int, k_max: int) -> int:
    """Decoded cache bytes of one view, as the cache format lays it out (:func:`stages.cache.raw_bytes_per_view`):
    features ``L·C·2`` + attention ``(K+1)·H·L·2`` + top-k ``K·2`` + views ``5·4``."""
    shapes = SimpleNamespace(n_images=1, views_per_image=1, num_patches=num_patches, embed_dim=embed_dim,
                             num_heads=num_heads, k_max=k_max)  # the fields array_shapes reads
    return raw_bytes_per_view(shapes)


def _arch(arch: str | dict[str, Any]) -> dict[str, Any]:
    return vit_kwargs(arch) if isinstance(arch, str) else dict(arch)


def project(
    n_images: int,
    base: str | dict[str, Any],
    *,
    views_per_image: int,
    epochs: float,
    runs: int = 1,
    k_max: int = 15,
    new: str | dict[str, Any] | None = None,
    tec: dict[str, Any] | None = None,
    step_rate_views_per_s_per_worker: float = 1000.0,
    device_macs_per_s: float = 150e12,
    device_price_per_hour: float = 2.0,
    codec: str = LOSSLESS,
    blosc_ratio: float | None = None,
    local_cache_max_bytes: int | None = None,
) -> dict[str, Any]:
    """Project a cache and its runs on paper (MACs; FLOPs = 2×MACs).

    Args:
        n_images: N, images in the data set.
        base: the base model, an arch name of :mod:`tec_model.archs` or VisionTransformer kwargs.
        views_per_image: V. epochs: per run (one view per image per epoch). runs: runs sharing the cache.
        k_max: attention rows stored besides cls.
        new: the new model (name or kwargs), to count its own training MACs; None to skip.
        tec: :func:`pipeline.flops.tec_step_macs` keywords for the new model (default: topk = k_max).
        step_rate_views_per_s_per_worker: training views/s of one worker, for the bandwidth it needs.
        device_macs_per_s: sustained device throughput in MACs/s (= sustained FLOP/s ÷ 2).
        device_price_per_hour: price of one device-hour (any currency).
        codec: ``extract.codec``, the layout whose bytes are stored, read and sent (:mod:`stages.cache.codecs`).
        blosc_ratio: Blosc's after/before bytes of that layout; None: :data:`STORED_OVER_RAW` (0.82, measured) for
            float16, and none applied (1.0, an upper bound) for int8 / fp8, whose 0.82 was never measured
            (docs/benchmarks.md#target-codecs has their ratios on test bases).
        local_cache_max_bytes: ``train.local_cache.max_bytes`` (None: unbounded), for the object-store bytes of a
            run with the node-local cache (:func:`object_store_bytes_with_local_cache`).

    Returns:
        A dict of the numbers :func:`format_projection` prints: bytes per view (raw float16, ``codec``'s before
        Blosc, stored; ``stored_over_raw`` = stored / raw), storage, extraction
        MACs/device-hours/cost, bandwidth per worker, per-run views, base MACs avoided, device-hours and money
        saved, break-even (``break_even_run_epochs`` = V), net saving over ``runs`` and, with ``new``, training MACs.
    """
    kw = _arch(base)
    length = num_patches(kw)
    per_view_raw = bytes_per_view(length, kw["embed_dim"], kw["num_heads"], k_max)
    per_view_codec, ratio, source = _codec_bytes(codec, blosc_ratio, length, kw, k_max)
    per_view_stored = per_view_codec * ratio
    base_macs = base_macs_per_view(kw)
    views = n_images * views_per_image
    views_per_run = n_images * epochs
    hours = 1 / device_macs_per_s / 3600  # device-hours per MAC
    out: dict[str, Any] = {
        "unit": UNIT, "n_images": n_images, "views_per_image": views_per_image, "epochs": epochs, "runs": runs,
        "codec": codec, "bytes_per_view_raw": per_view_raw, "bytes_per_view_codec": per_view_codec,
        "bytes_per_view_stored": per_view_stored, "blosc_ratio": ratio, "blosc_ratio_source": source,
        "storage_raw_bytes": n_images * (views_per_image * per_view_raw + 1),  # + the valid flag
        "base_macs_per_view": base_macs, "extraction_macs": views * base_macs,
        "extraction_device_hours": views * base_macs * hours,
        "bandwidth_bytes_per_s_per_worker": per_view_stored * step_rate_views_per_s_per_worker,
        "views_per_run": views_per_run, "reuse_per_view_per_run": epochs / views_per_image,
        "bytes_read_per_run": views_per_run * per_view_stored,
        "base_macs_avoided_per_run": views_per_run * base_macs,
        "device_hours_saved_per_run": views_per_run * base_macs * hours,
        "break_even_run_epochs": views_per_image, "break_even_reached": runs * epochs >= views_per_image,
        "net_saving_macs": runs * views_per_run * base_macs - views * base_macs,
        "step_rate_views_per_s_per_worker": step_rate_views_per_s_per_worker,
        "device_macs_per_s": device_macs_per_s, "device_price_per_hour": device_price_per_hour,
        "stored_over_raw": per_view_stored / per_view_raw,
    }
    out["storage_by_codec"] = {  # uncompressed stored bytes (before Blosc), docs/cache-format.md#10-target-codecs
        c: n_images * (views_per_image * stored_bytes_per_view(c, length, kw["embed_dim"], kw["num_heads"], k_max) + 1)
        for c in CODECS}
    out["storage_stored_bytes"] = out["storage_by_codec"][codec] * ratio
    out["object_store_bytes_per_run_local_cache"] = object_store_bytes_with_local_cache(
        out["bytes_read_per_run"], out["storage_stored_bytes"], local_cache_max_bytes)
    out["local_cache_max_bytes"] = local_cache_max_bytes
    out["extraction_cost"] = out["extraction_device_hours"] * device_price_per_hour
    out["money_saved_per_run"] = out["device_hours_saved_per_run"] * device_price_per_hour
    out["net_saving_device_hours"] = out["net_saving_macs"] * hours
    if new is not None:
        settings = {"topk": k_max, **(tec or {})}
        train = tec_step_macs(_arch(new), kw["embed_dim"], kw["num_heads"], length, **settings)
        out["train_macs_per_view"] = train["train_macs_per_sample"]
        out["train_device_hours_per_run"] = views_per_run * train["train_macs_per_sample"] * hours
        out["online_saving_fraction"] = base_macs / (base_macs + train["train_macs_per_sample"])
    log.debug("projection: %s", out)
    return out


def _codec_bytes(codec: str, blosc_ratio: float | None, length: int, kw: dict[str, Any],
                 k_max: int) -> tuple[int, float, str]:
    """``(bytes of one view under codec before Blosc, Blosc's after/before ratio, where it comes from)``: the ratio
    is ``blosc_ratio`` (``given``) or, by default, :data:`STORED_OVER_RAW` for float16 (``measured``) and 1.0 for
    int8 / fp8 (``none``: no ratio applied, an upper bound).

    Raises:
        ValueError: an unknown ``codec`` (it names ``extract.codec``), or ``blosc_ratio`` outside (0, 1].
    """
    try:
        check_codec(codec)
    except ValueError as err:
        raise ValueError(f"extract.codec: {err}") from None
    if blosc_ratio is not None and not 0 < blosc_ratio <= 1:
        raise ValueError(f"blosc_ratio: expected a stored/uncompressed ratio in (0, 1], got {blosc_ratio}")
    per_view = stored_bytes_per_view(codec, length, kw["embed_dim"], kw["num_heads"], k_max)
    if blosc_ratio is not None:
        return per_view, blosc_ratio, "given"
    return (per_view, STORED_OVER_RAW, "measured") if codec == LOSSLESS else (per_view, 1.0, "none")


def object_store_bytes_with_local_cache(bytes_read: float, stored: float, max_bytes: int | None) -> float:
    """Object-store bytes of one run on one node with the node-local cache: the kept share k = min(1,
    max_bytes / stored) is fetched once, whole; the rest is read as without the cache; never more than without it
    (a run reading less than all of an object keeps nothing it would fetch whole, :mod:`stages.cache.local_tier`).
    """
    k = 1.0 if max_bytes is None or not stored else min(1.0, max_bytes / stored)
    return min(bytes_read, k * stored + (1.0 - k) * bytes_read)


def _stored_note(p: dict[str, Any]) -> str:
    """How the stored bytes per view were reached: a measured Blosc ratio, a given one, or none (an upper bound)."""
    note = f"stored/raw {p['stored_over_raw']:.3g}"
    if p["blosc_ratio_source"] == "measured":
        return note
    if p["blosc_ratio_source"] == "none":
        return (f"{note}: {p['codec']} before Blosc, an upper bound; the measured {STORED_OVER_RAW} Blosc ratio is "
                f"{LOSSLESS}'s")
    return f"{note}: {p['codec']} × a given Blosc ratio {p['blosc_ratio']:g}"


def format_projection(p: dict[str, Any]) -> str:
    """The projection as text."""
    tb, gbs = 1e12, 1e9
    lines = [
        f"projection: N={p['n_images']:,} images, V={p['views_per_image']}, {p['epochs']:g} epochs × {p['runs']} "
        f"run(s); unit: {p['unit']}",
        f"  bytes per view     {p['bytes_per_view_raw']:,} B raw, {p['bytes_per_view_stored']:,.0f} B stored "
        f"({_stored_note(p)})",
        f"  storage            {p['storage_raw_bytes'] / tb:.3f} TB raw, "
        f"{p['storage_stored_bytes'] / tb:.3f} TB stored",
        "  storage per codec  " + ", ".join(f"{codec} {size / tb:.3f} TB" for codec, size in
                                            p["storage_by_codec"].items()) + " (extract.codec; before Blosc)",
        f"  extraction         {format_macs(p['extraction_macs'])} = {p['extraction_device_hours']:,.2f} "
        f"device-hours at {format_macs(p['device_macs_per_s'])}/s = {p['extraction_cost']:,.2f} at "
        f"{p['device_price_per_hour']:g}/h",
        f"  bandwidth          {p['bandwidth_bytes_per_s_per_worker'] / gbs:.3f} GB/s per worker at "
        f"{p['step_rate_views_per_s_per_worker']:g} views/s",
        f"  saving per run     {format_macs(p['base_macs_avoided_per_run'])} = "
        f"{p['device_hours_saved_per_run']:,.2f} device-hours = {p['money_saved_per_run']:,.2f}; reads "
        f"{p['bytes_read_per_run'] / tb:.3f} TB; each view served {p['reuse_per_view_per_run']:g}× per run",
        f"  object store       {p['bytes_read_per_run'] / tb:.3f} TB per run without the local cache, "
        f"{p['object_store_bytes_per_run_local_cache'] / tb:.3f} TB per node with it (train.local_cache, bound "
        + ("none" if p["local_cache_max_bytes"] is None else f"{p['local_cache_max_bytes'] / tb:.3f} TB") + ")",
        f"  break-even         runs×epochs needed = V = {p['break_even_run_epochs']}; planned "
        f"{p['runs'] * p['epochs']:g}: {'reached' if p['break_even_reached'] else 'not reached'}; net saving "
        f"{format_macs(p['net_saving_macs'])} = {p['net_saving_device_hours']:,.2f} device-hours",
    ]
    if "train_macs_per_view" in p:
        lines.append(
            f"  new model          {format_macs(p['train_macs_per_view'])} per view (train = 3× forward); "
            f"{p['train_device_hours_per_run']:,.2f} device-hours per run; the cache removes "
            f"{100 * p['online_saving_fraction']:.1f}% of online TEC's per-view MACs")
    return "\n".join(lines)
