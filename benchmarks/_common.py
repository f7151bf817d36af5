"""Shared helpers of the benchmarks: settings, one export reused across runs, atomic output files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from progfl.manifest import SCHEMA_VERSION, write_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out"
STAGES = ["grow-0", "grow-1", "grow-2", "grow-3", "full"]


@dataclass(frozen=True)
class Settings:
    """What the artifacts and measurements depend on. quick: a narrow model for smoke runs."""

    model: str = "resnet18"
    width: int = 64
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)
    batches: tuple[int, ...] = (32, 64)
    steps: int = 3
    threads: int = 2
    seed: int = 0
    kinds: tuple[str, ...] = ("grow", "full")
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def make(quick: bool) -> Settings:
        return Settings(width=16, batches=(8, 16), steps=2) if quick else Settings()

    @property
    def tag(self) -> str:
        return f"{self.model}-w{self.width}-c{self.num_classes}-{'x'.join(map(str, self.input_shape))}"

    def export_key(self) -> dict[str, Any]:
        """Only what changes the artifacts (not the batches or steps measured)."""
        return {"model": self.model, "width": self.width, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "seed": self.seed, "kinds": list(self.kinds),
                "opset": 17, "optimizer": "sgd-momentum-0.9-wd-5e-4", "schema": SCHEMA_VERSION}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


def build(settings: Settings):
    """The benchmark's model, seeded (imports torch)."""
    import torch

    from progfl.models import build_model

    torch.manual_seed(settings.seed)
    return build_model(settings.model, settings.num_classes, settings.input_shape, width=settings.width)


def ensure_export(settings: Settings, out: Path, log=print) -> Path:
    """Export grow-* and full once into out/artifacts-TAG; reuse it when its settings file matches."""
    folder = out / f"artifacts-{settings.tag}"
    key_file = out / f"artifacts-{settings.tag}.settings.json"
    key = settings.export_key()
    if (folder / "manifest.json").exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        log(f"reusing export {folder}")
        return folder
    import shutil
    import time

    from progfl.exporter import export_model
    from progfl.manifest import DeviceClass

    shutil.rmtree(folder, ignore_errors=True)
    key_file.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"exporting {settings.tag} into {folder} ...")
    export_model(build(settings), folder, [DeviceClass("bench", 1 << 20)], kinds=settings.kinds,
                 batch_size=max(settings.batches), measure=False, progress=lambda m: log("  " + m), backends=("ort",))
    write_json(key_file, key)
    log(f"export took {time.perf_counter() - t0:.0f} s")
    return folder


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_figure(fig, path: Path) -> None:
    """matplotlib figure -> PNG, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
