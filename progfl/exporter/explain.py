"""The manifest's memory table and device sizing as a table a person reads."""

from __future__ import annotations

from ..manifest import Manifest
from .sizing import floor_mb


def _cell(z) -> str:
    if not z.fits:
        return "-"
    return f"{z.micro_batch}" if z.accum_steps == 1 else f"{z.micro_batch}x{z.accum_steps}"


def _output_module(manifest: Manifest) -> str:
    """The kind of basic layer in the output modules, and the export's reasons (manifests before it was a choice:
    ProFL's linear basic layers)."""
    kind = manifest.model_config.get("output_module", "linear")
    return "\n".join([f"output modules: {kind} basic layers", *(f"  {n}" for n in manifest.notes)])


def explain(manifest: Manifest) -> str:
    """One row per stage and backend: measured (estimated) peaks on the exporter's machine, and the sizing of each
    device class that trains with that backend (classes sized by a board's profile say so below the table)."""
    batches = sorted({m.batch for s in manifest.stages for m in s.memory if m.source == "export"})
    backends = [b for b in manifest.backends if any(m.backend == b for s in manifest.stages for m in s.memory)]
    classes = manifest.device_classes
    head = ["stage", "backend", "trainable"] + [f"peak@{b} MB (est)" for b in batches] + [c.name for c in classes]
    rows = []
    for s in manifest.stages:
        for backend in (b for b in backends if s.has_backend(b)):
            mem = {m.batch: m for m in s.memory if m.backend == backend and m.source == "export"}
            n = s.footprint['trainable']
            cells = [s.name, backend, f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"]
            for b in batches:
                m = mem.get(b)
                measured = f"{m.measured_mb:.0f}" if m and m.measured_mb is not None else "?"
                cells.append(f"{measured} ({m.estimate_mb:.0f})" if m else "")
            cells += [_cell(s.sizing_for(c.name)) if c.backend == backend else "" for c in classes]
            rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    profiled = [f"{c.name} is sized by its board's profile" for c in classes if c.profile]
    legend = (f"\nmodel {manifest.model}, logical batch {manifest.batch_size}, safety margin "
              f"{manifest.safety_margin:.0%}; 1 MB = 2^20 bytes. Device cells: micro-batch (x accumulation steps) on "
              "the class's backend row; '-' cannot take part.\n"
              + "budgets: " + ", ".join(f"{c.name}={c.memory_mb:g} MB ({c.backend})" for c in classes)
              + "".join(f"\n{p}" for p in profiled) + "\n" + _output_module(manifest))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)]) + "\n" + legend


def breakdown(manifest: Manifest) -> str:
    """Where each stage's memory goes, per measured micro-batch: the probe's phases (what the device process held
    after each, and the most it held during it), the estimate's parts, and the analytic floor (floor_mb)."""
    out = []
    for s in manifest.stages:
        for m in (m for m in s.memory if m.source == "export" and m.phases):
            floor = floor_mb(s, m.batch, m.backend)
            total = sum(floor.values())
            out.append(f"{s.name} ({m.backend}), micro-batch {m.batch}: measured {m.measured_mb:.1f} MB, estimated "
                       f"{m.estimate_mb:.1f} MB, floor {total:.1f} MB (measured / floor {m.measured_mb / total:.2f})")
            out.append(f"  {'phase':<38} {'RSS after':>9} {'change':>8} {'peak in phase':>13}")
            before = 0.0
            for p in m.phases:
                out.append(f"  {p['name']:<38} {p['rss_mb']:9.1f} {p['rss_mb'] - before:+8.1f} {p['peak_mb']:13.1f}")
                before = p["rss_mb"]
            out.append("  estimate: " + ", ".join(f"{k} {v:.1f}" for k, v in m.breakdown.items()))
            out.append("  floor:    " + ", ".join(f"{k} {v:.1f}" for k, v in floor.items()))
    if not out:
        return "no measured phases: export with --measure"
    return "\n".join(out) + "\n1 MB = 2^20 bytes."
