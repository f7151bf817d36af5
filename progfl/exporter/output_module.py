"""Which output module (kind of basic layer) an export uses, by the rule that a stage never trains more parameters
or peaks higher than full-model training.

The parameter side is counted from the torch stage graphs before anything is compiled; the peak side compares the
measured peaks of an export (when it measured them and has a `full` stage). `auto` starts from the default kind and
falls back along OUTPUT_MODULES (conv -> light -> linear); an explicit kind that breaks the rule is refused.
NeuLite's projector is a loss head that full-model training does not have: it is left out of a neulite stage's
count (the same as counting it on both sides). For the same reason neulite stages' peaks are reported, not held to
full's: the loss head (projector, HSIC kernels, the raw input) costs memory whatever the output module (measured on
a 10k-parameter depthwise-separable CNN at micro-batch 32: neulite-1 94.0 MB, grow-1 81.0 MB, full 82.3 MB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..manifest import Manifest
from ..models.base import DEFAULT_OUTPUT_MODULE, OUTPUT_MODULES, BlockModel
from ..models.stages import StageSpec, build_stage

CHOICES = ("auto", *OUTPUT_MODULES)
RULED_KINDS = ("grow", "neulite")  # the stages that train an output module: held to full's parameter count
PEAK_RULED_KINDS = ("grow",)  # held to full's measured peak (neulite: reported, see the module docstring)
PEAK_TOLERANCE_MB, PEAK_TOLERANCE_SHARE = 0.5, 0.01  # measurement noise: repeated probes of one stage vary ~0.3 MB


@dataclass(frozen=True)
class RuleBreak:
    """One stage above full-model training: in trainable parameters, or in measured peak MB at a micro-batch."""

    stage: str
    value: float
    full: float
    batch: int | None = None  # None: a parameter count

    def describe(self) -> str:
        if self.batch is None:
            return f"{self.stage} trains {self.value:,.0f} parameters, full-model training {self.full:,.0f}"
        return (f"{self.stage} peaks at {self.value:.1f} MB at micro-batch {self.batch}, "
                f"full-model training {self.full:.1f} MB")


def candidates(requested: str) -> list[str]:
    """The kinds to try in order: an explicit kind alone, or `auto`: the default and every cheaper kind after it."""
    if requested not in CHOICES:
        raise ValueError(f"unknown output module {requested!r}: use {', '.join(CHOICES)}")
    if requested != "auto":
        return [requested]
    return list(OUTPUT_MODULES[OUTPUT_MODULES.index(DEFAULT_OUTPUT_MODULE):])


@contextlib.contextmanager
def trial(model: BlockModel, kind: str) -> Iterator[BlockModel]:
    """The model with `kind`'s basic layers for the duration; its own basics, config and the RNG stay as they were."""
    basics, config = model.basics, dict(model.config)
    with torch.random.fork_rng(devices=[]):
        try:
            yield model.set_output_modules(kind)
        finally:
            model.basics, model.config = basics, config


def trainable_count(model: BlockModel, spec: StageSpec) -> int:
    """Trainable parameters of a stage's training graph (NeuLite's projector left out, see the module docstring)."""
    params = build_stage(model, spec).train.trainable_parameters()
    return sum(p.numel() for n, p in params if not n.startswith("projector."))


def parameter_breaks(model: BlockModel, specs: list[StageSpec], kind: str) -> list[RuleBreak]:
    """Grow/neulite stages that would train more parameters than full-model training (every block + classifier)."""
    with trial(model, kind):
        full = trainable_count(model, StageSpec("full", 0))
        counts = {s.name: trainable_count(model, s) for s in specs if s.kind in RULED_KINDS}
    return [RuleBreak(name, n, full) for name, n in counts.items() if n > full]


def largest_count(model: BlockModel, specs: list[StageSpec]) -> tuple[str, int, int] | None:
    """(stage, count, full's count) of the grow/neulite stage training the most parameters, with the model as it is."""
    full = trainable_count(model, StageSpec("full", 0))
    counts = [(trainable_count(model, s), s.name) for s in specs if s.kind in RULED_KINDS]
    if not counts:
        return None
    n, name = max(counts)
    return name, n, full


def peak_breaks(manifest: Manifest, kinds: tuple[str, ...] = PEAK_RULED_KINDS) -> list[RuleBreak]:
    """Stages of `kinds` whose measured peak is above full's at the same micro-batch and backend (beyond measurement
    noise). Empty when the export has no `full` stage or measured nothing."""
    full = _full_peaks(manifest)
    out = []
    for s in manifest.stages:
        if s.kind not in kinds:
            continue
        for m in s.memory:
            ref = full.get((m.backend, m.batch))
            if ref is not None and m.measured_mb is not None and m.measured_mb > ref + peak_tolerance(ref):
                out.append(RuleBreak(s.name, m.measured_mb, ref, m.batch))
    return out


def peak_tolerance(full_mb: float) -> float:
    return max(PEAK_TOLERANCE_MB, PEAK_TOLERANCE_SHARE * full_mb)


def _full_peaks(manifest: Manifest) -> dict[tuple[str, int], float]:
    """(backend, micro-batch) -> full-model training's peak measured by the exporter."""
    for s in manifest.stages:
        if s.kind == "full":
            return {(m.backend, m.batch): m.measured_mb for m in s.memory
                    if m.measured_mb is not None and m.source == "export"}
    return {}


def largest_peak_share(manifest: Manifest) -> tuple[str, int, float, float, str] | None:
    """(stage, micro-batch, peak, full's peak, backend) of the grow stage closest to full's peak, or None."""
    full = _full_peaks(manifest)
    rows = [(m.measured_mb / full[m.backend, m.batch], s.name, m.batch, m.measured_mb, full[m.backend, m.batch],
             m.backend)
            for s in manifest.stages if s.kind in PEAK_RULED_KINDS
            for m in s.memory if m.measured_mb is not None and (m.backend, m.batch) in full]
    if not rows:
        return None
    _, name, b, peak, ref, backend = max(rows)
    return name, b, peak, ref, backend


def suggestion(kind: str, fits: list[str]) -> str:
    """What to try instead of `kind`: the next cheaper kind that passes the parameter rule, else any that does."""
    order = OUTPUT_MODULES[OUTPUT_MODULES.index(kind) + 1:] + OUTPUT_MODULES[:OUTPUT_MODULES.index(kind)]
    for k in order:
        if k in fits:
            return f"try --output-module {k} (or auto)"
    return "no other output module passes the parameter count either"


@dataclass
class Choice:
    """The output module an export settles on, and why (one line per decision, for the manifest's notes)."""

    requested: str
    kind: str
    tried: list[tuple[str, list[RuleBreak]]]  # kinds given up on, and what broke the rule

    def notes(self, model: BlockModel, specs: list[StageSpec], manifest: Manifest | None, measured: bool) -> list[str]:
        if self.requested != "auto":
            how = "requested"
        else:
            broke = ", ".join(k for k, _ in self.tried)
            how = f"auto: {broke} broke the rule" if self.tried else "auto: the default kind"
        lines = [f"output module {self.kind} ({how}): a stage may train no more parameters and peak no higher than "
                 "full-model training"]
        for kind, breaks in self.tried:
            lines.append(f"output module {kind} was not used: " + "; ".join(b.describe() for b in breaks[:3])
                         + (f" (and {len(breaks) - 3} more)" if len(breaks) > 3 else ""))
        big = largest_count(model, specs)
        if big:
            extra = ", NeuLite's projector not counted" if any(s.kind == "neulite" for s in specs) else ""
            lines.append(f"parameters: every grow/neulite stage trains at most full-model training's {big[2]:,} "
                         f"(largest: {big[0]} with {big[1]:,}{extra})")
        peak = largest_peak_share(manifest) if manifest is not None else None
        if peak:
            lines.append(f"peaks: no grow stage peaks above full-model training (closest: {peak[0]} on {peak[4]}, "
                         f"{peak[2]:.1f} MB vs {peak[3]:.1f} MB at micro-batch {peak[1]}; noise allowance "
                         f"{peak_tolerance(peak[3]):.1f} MB)")
        else:
            why = "the export did not measure them" if not measured else "no full or grow stage was exported"
            lines.append(f"peaks: not compared ({why})")
        over = peak_breaks(manifest, ("neulite",)) if manifest is not None else []
        if over:
            worst = max(over, key=lambda b: b.value - b.full)
            lines.append(f"peaks: {len(over)} neulite stage(s) above full-model training, from NeuLite's loss head "
                         f"(projector, HSIC), not the output module (largest: {worst.describe()})")
        return lines


def refuse(requested: str, tried: list[tuple[str, list[RuleBreak]]], fits: list[str]) -> str:
    """The one-line reason an export is refused."""
    if requested != "auto":
        kind, breaks = tried[-1]
        return (f"output module {kind} makes a stage cost more than full-model training: {breaks[0].describe()}; "
                f"{suggestion(kind, fits)}")
    detail = "; ".join(f"{k}: {b[0].describe()}" for k, b in tried)
    return f"no output module keeps every stage within full-model training ({detail})"
