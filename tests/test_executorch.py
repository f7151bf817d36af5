"""The EXPERIMENTAL ExecuTorch backend's parts that need no ExecuTorch: which stages ExecuTorch 1.5.1 can train
(decided from the torch modules), and clear errors where executorch is not installed. Training parity with the
torch backend needs executorch: tools/executorch/check.py."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

from progfl.exporter.executorch_files import executorch_refusal, write_executorch_files
from progfl.models import build_model
from progfl.manifest import ManifestError
from progfl.models.stages import NeuLiteWeights, build_stage, parse_stage_name


def _graphs(name: str, norm: str, stage: str):
    torch.manual_seed(0)
    if name == "vit":
        model = build_model("vit", 10, (3, 8, 8), norm=norm, width=16, depth=4, heads=1)
    else:
        model = build_model("cnn", 10, (1, 12, 12), norm=norm, width=8)
    return build_stage(model, parse_stage_name(stage), NeuLiteWeights())


def test_batch_norm_stage_is_refused_and_the_graph_is_untouched():
    g = _graphs("cnn", "batch", "grow-2")  # no max-pool in block 2: BatchNorm is the only reason
    before = {k: v.clone() for k, v in g.train.state_dict().items()}
    grads = {n: p.requires_grad for n, p in g.train.named_parameters()}
    line = executorch_refusal(g)
    assert line is not None and line.startswith("stage grow-2: ExecuTorch 1.5.1 has no training-mode BatchNorm")
    assert "aten::_native_batch_norm_legit_functional" in line and "--norm group" in line
    assert "\n" not in line
    for k, v in g.train.state_dict().items():  # running statistics not moved by the check's forward
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in g.train.named_parameters()} == grads


def test_max_pool_in_the_trained_block_is_refused_by_name():
    line = executorch_refusal(_graphs("cnn", "group", "grow-1"))
    assert line is not None and line.startswith("stage grow-1: a max-pool (blocks.1.1) lies in the backward path")
    assert "executorch#21686" in line and "blocks.0.1" not in line  # block 0's pool is in the frozen prefix
    full = executorch_refusal(_graphs("cnn", "group", "full"))
    assert full is not None and "(blocks.0.1, blocks.1.1)" in full


@pytest.mark.parametrize("model,stage", [("vit", "grow-1"), ("vit", "neulite-1"), ("cnn", "distill-1"),
                                         ("cnn", "grow-2"), ("cnn", "neulite-2")])
def test_stages_without_a_max_pool_in_the_backward_path_are_accepted(model, stage):
    """cnn neulite-2 co-adapts blocks.1.1, the max-pool itself: it is in the train graph but its input is the frozen
    features, so its backward feeds no trained parameter."""
    g = _graphs(model, "group", stage)
    if stage == "neulite-2":
        assert any(isinstance(m, torch.nn.MaxPool2d) for m in g.train.modules())
    assert executorch_refusal(g) is None


def test_backend_import_without_executorch_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)  # as if not installed, whether or not it is
    monkeypatch.delitem(sys.modules, "progfl.device_torch.executorch_backend", raising=False)
    with pytest.raises(ImportError, match=r"pip install executorch==1\.5\.1"):
        importlib.import_module("progfl.device_torch.executorch_backend")


def test_writing_files_without_executorch_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "executorch", None)
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 12, 12), norm="group", width=8)
    with pytest.raises(ImportError, match=r"pip install executorch==1\.5\.1"):
        write_executorch_files(model, parse_stage_name("grow-2"), NeuLiteWeights(), {}, tmp_path, max_batch=8)


def test_export_and_manifest_wiring_without_executorch(tmp_path):
    """Refused up front where executorch is missing or torch's files are not asked for; a manifest whose stages only
    partly have executorch files lists the backend, hands out torch's eval files with the program, and sizes an
    executorch device out of the stages it cannot train."""
    from progfl.exporter import ExportError, export_model
    from progfl.manifest import DeviceClass, size_stage

    model = build_model("cnn", 10, (1, 12, 12), norm="group", width=8)
    classes = [DeviceClass("big", 4096.0)]
    with pytest.raises(ExportError, match=r"^the executorch backend runs the frozen prefix from torch's files"):
        export_model(model, tmp_path / "a", classes, backends=("ort", "executorch"), measure=False)
    if importlib.util.find_spec("executorch") is None:
        with pytest.raises(ExportError, match=r"^writing ExecuTorch programs needs ExecuTorch here: pip install "):
            export_model(model, tmp_path / "a", classes, backends=("ort", "torch", "executorch"), measure=False)
    assert not (tmp_path / "a").exists()

    m = export_model(model, tmp_path / "a", classes, kinds=("grow",), batch_size=8, measure=False)
    assert m.backends == ["ort", "torch"]
    grow2 = m.stage("grow-2")
    grow2.files["executorch.training"] = grow2.files["torch.training"]  # stands in for a program
    assert m.backends == ["ort", "torch", "executorch"]
    files = grow2.backend_files("executorch")
    assert files["training"] is grow2.files["executorch.training"] and files["prefix"] is grow2.files["torch.prefix"]
    assert set(grow2.backend_files("ort")) == {"prefix", "training", "checkpoint", "inference"}
    with pytest.raises(ManifestError, match="grow-1 has no executorch files"):
        m.stage("grow-1").backend_files("executorch")
    assert not size_stage(m.stage("grow-1"), 4096.0, 8, 0.15, backend="executorch").fits
    # whole-export operations of a backend cover the stages that have it (a board's profile, file checks)
    assert m.files_digest("executorch") != m.files_digest("torch")
    m.verify_files(tmp_path / "a", backend="executorch")
