"""The export's rule: a stage never trains more parameters or peaks higher than full-model training. `auto` falls
back conv -> light -> linear; an explicit kind that breaks the rule is refused with the numbers."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from progfl.exporter import ExportError, explain, export_model
from progfl.manifest import DeviceClass, Manifest
from progfl.models import build_model, from_sequential
from progfl.models.examples import depthwise_separable

CLASSES = [DeviceClass("big", 4096.0)]


def dws_model() -> nn.Module:
    torch.manual_seed(0)
    return from_sequential(depthwise_separable(), (1, 28, 28), 10)


def counts(model, kind: str) -> tuple[int, int]:
    """(grow-0's trainable parameters, full-model training's), counted here without the exporter."""
    m = copy.deepcopy(model).set_output_modules(kind)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    full = n(m.blocks) + n(m.classifier)
    return n(m.blocks[0]) + n(m.basics) + n(m.classifier), full


def test_auto_picks_light_for_a_depthwise_separable_model(tmp_path):
    model = dws_model()
    conv_grow0, full = counts(model, "conv")
    assert conv_grow0 > full  # the case this test is about
    lines = []
    manifest = export_model(model, tmp_path / "a", CLASSES, kinds=("grow", "neulite", "full"), batch_size=8,
                            measure=False, backends=("ort",), progress=lines.append)
    assert model.output_module == "light" and manifest.model_config["output_module"] == "light"
    light_grow0, _ = counts(model, "light")
    assert manifest.stage("grow-0").footprint["trainable"] == light_grow0 <= full
    assert all(s.footprint["trainable"] <= full for s in manifest.stages if s.kind == "grow")
    why = f"grow-0 trains {conv_grow0:,} parameters, full-model training {full:,}"
    assert any(why in n for n in manifest.notes), manifest.notes
    assert manifest.notes[0].startswith("output module light (auto: conv broke the rule)")
    assert any(why in line for line in lines)  # printed through progress
    again = Manifest.load(tmp_path / "a")
    assert again.notes == manifest.notes
    table = explain(again)
    assert "output modules: light basic layers" in table and why in table


def test_explicit_kind_that_breaks_the_rule_is_refused(tmp_path):
    model = dws_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv_grow0, full = counts(model, "conv")
    linear_grow0, _ = counts(model, "linear")
    with pytest.raises(ExportError) as e:
        export_model(model, tmp_path / "a", CLASSES, kinds=("grow", "full"), measure=False,
                     backends=("ort",), output_module="conv")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"grow-0 trains {conv_grow0:,} parameters, full-model training {full:,}" in msg
    assert "try --output-module light" in msg
    with pytest.raises(ExportError, match=f"output module linear .*grow-0 trains {linear_grow0:,} parameters"):
        export_model(model, tmp_path / "a", CLASSES, kinds=("grow", "full"), measure=False,
                     backends=("ort",), output_module="linear")
    assert list(tmp_path.iterdir()) == []
    assert model.output_module == "conv"  # a refused export leaves the model as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_refused_when_no_kind_fits(tmp_path):
    """Blocks without parameters (pooling) are cheaper than any basic layer: nothing can stand in for them."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                        nn.MaxPool2d(2), nn.MaxPool2d(2))
    model = from_sequential(seq, (1, 16, 16), 10)
    with pytest.raises(ExportError, match=r"^no output module keeps every stage within full-model training "
                                          r"\(conv: grow-0 .*; light: grow-0 .*; linear: grow-0 [^;]*\)$"):
        export_model(model, tmp_path / "a", CLASSES, kinds=("grow", "full"), measure=False, backends=("ort",))
    assert list(tmp_path.iterdir()) == []


def fake_peaks(grow_over_full: dict[str, float]):
    """A stand-in for fill_memory: every stage gets 100 MB, grow-0 100 MB + grow_over_full[kind]."""
    from progfl.exporter.sizing import estimate

    def fill(manifest, folder, batches, measured, progress=None, backends=("ort",)):
        kind = manifest.model_config["output_module"]
        for s in manifest.stages:
            s.memory = []
            for b in batches:
                p = estimate(s, b)
                p.measured_mb = 100.0 + (grow_over_full.get(kind, 0.0) if s.name == "grow-0" else 0.0)
                s.memory.append(p)
    return fill


def test_auto_falls_back_on_measured_peaks(tmp_path, monkeypatch):
    """conv passes the parameter count, but its grow-0 peaks 5 MB above full: auto exports again with light."""
    import progfl.exporter.export as ex

    monkeypatch.setattr(ex, "fill_memory", fake_peaks({"conv": 5.0, "light": 0.3}))  # 0.3 MB: within noise
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 28, 28), width=4)
    lines = []
    manifest = export_model(model, tmp_path / "a", CLASSES, kinds=("grow", "full"), batch_size=8,
                            measure_batches=[8], progress=lines.append)
    assert manifest.model_config["output_module"] == "light" == model.output_module
    assert any("grow-0 peaks at 105.0 MB at micro-batch 8, full-model training 100.0 MB" in n for n in manifest.notes)
    assert any("exporting again with light" in line for line in lines)
    Manifest.load(tmp_path / "a").verify_files(tmp_path / "a")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    # the same peaks with an explicit conv: refused, with the numbers and what to try
    monkeypatch.setattr(ex, "fill_memory", fake_peaks({"conv": 5.0}))
    with pytest.raises(ExportError, match=r"^output module conv .*: grow-0 peaks at 105.0 MB at micro-batch 8, "
                                          r"full-model training 100.0 MB; try --output-module light"):
        export_model(build_model("cnn", 10, (1, 28, 28), width=4), tmp_path / "b", CLASSES, kinds=("grow", "full"),
                     batch_size=8, measure_batches=[8], output_module="conv")
    # every kind peaking above full: refused
    monkeypatch.setattr(ex, "fill_memory", fake_peaks({"conv": 5.0, "light": 5.0, "linear": 5.0}))
    with pytest.raises(ExportError, match=r"^no output module keeps .*conv: grow-0 peaks.*linear: grow-0 peaks"):
        export_model(build_model("cnn", 10, (1, 28, 28), width=4), tmp_path / "c", CLASSES, kinds=("grow", "full"),
                     batch_size=8, measure_batches=[8])
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_measured_export_compares_peaks(tmp_path):
    """A real measurement (torch-free probes): the notes name the grow stage closest to full's peak."""
    torch.manual_seed(0)
    manifest = export_model(build_model("cnn", 10, (1, 28, 28), width=4), tmp_path / "a", CLASSES,
                            kinds=("grow", "full"), batch_size=8, measure_batches=[8], backends=("ort",))
    assert manifest.model_config["output_module"] == "conv"
    assert manifest.notes[0].startswith("output module conv (auto: the default kind)")
    assert any(n.startswith("peaks: no grow stage peaks above full-model training") and "micro-batch 8" in n
               for n in manifest.notes)
    unmeasured = export_model(build_model("cnn", 10, (1, 28, 28), width=4), tmp_path / "b", CLASSES,
                              kinds=("grow", "full"), batch_size=8, measure=False, backends=("ort",))
    assert "peaks: not compared (the export did not measure them)" in unmeasured.notes


def test_manifest_without_notes_still_loads(tmp_path):
    torch.manual_seed(0)
    export_model(build_model("cnn", 10, (1, 12, 12), width=4), tmp_path / "a", CLASSES, kinds=("grow",), batch_size=8,
                 measure=False, backends=("ort",), output_module="linear")
    path = tmp_path / "a" / "manifest.json"
    d = json.loads(path.read_text())
    assert d["notes"] and d["model_config"]["output_module"] == "linear"
    del d["notes"], d["model_config"]["output_module"]  # as written before output modules were a choice
    old = Manifest.from_dict(d)
    assert old.notes == []
    assert "output modules: linear basic layers" in explain(old)


def test_cli_output_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "progfl.cli", "export", "--model", "cnn", "--input-shape", "1,12,12",
                        "--width", "4", "--stages", "grow", "--no-measure", "--output-module", "light",
                        "--out", str(tmp_path / "a"), "--explain"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Manifest.load(tmp_path / "a").model_config["output_module"] == "light"
    assert "output modules: light basic layers" in r.stdout
    assert "output module light (requested)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "progfl.cli", "export", "--output-module", "wide", "--out",
                        str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode == 2 and "wide" in r.stderr
