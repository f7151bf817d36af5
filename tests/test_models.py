"""The zoo and from_sequential: block structure, stage forwards, and every stage's training graph."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from progfl.models import (
    ZOO,
    BlockModel,
    build_model,
    build_stage,
    default_stages,
    from_sequential,
)
from progfl.models.norms import GroupNorm, LayerNorm

CLASSES = 5
TINY = {  # name -> (build kwargs, expected number of blocks)
    "resnet18": (dict(input_shape=(3, 32, 32), width=8), 4),
    "resnet34": (dict(input_shape=(1, 28, 28), width=8), 4),
    "vgg11": (dict(input_shape=(3, 32, 32), width=8), 5),
    "vgg11-28": (dict(input_shape=(1, 28, 28), width=8), 5),
    "cnn": (dict(input_shape=(1, 28, 28), width=8), 3),
    "vit": (dict(input_shape=(1, 28, 28), width=32, patch=7, heads=2), 3),
}


def tiny(key: str, **kw) -> BlockModel:
    torch.manual_seed(0)
    args, _ = TINY[key]
    return build_model(key.split("-")[0], num_classes=CLASSES, **{**args, **kw})


def batch(model: BlockModel, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, *model.input_shape), torch.arange(n) % model.num_classes


def check_stages(model: BlockModel) -> None:
    """Every stage's training graph gives a finite loss and uses only global parameter names."""
    x, y = batch(model)
    global_names = set(model.state_dict())
    specs = default_stages(model.T, ("grow", "distill", "neulite", "full"))
    assert len(specs) == 3 * model.T  # grow T, distill T-1, neulite T, full 1
    for spec in specs:
        graphs = build_stage(model, spec)
        with torch.no_grad():
            features = graphs.prefix(x) if graphs.prefix is not None else x
            extra = {"labels": y, "inputs": x}
            if graphs.teacher is not None:
                extra["teacher"] = graphs.teacher(features)
            rest = [extra[n] for n in graphs.train.input_names()[1:]]
        loss, logits, data_loss = graphs.train(features, *rest)
        assert logits.shape == (len(x), model.num_classes), spec.name
        assert torch.isfinite(loss) and torch.isfinite(data_loss), spec.name
        names = [n for n, _ in graphs.train.named_parameters()]
        assert names and set(names) <= global_names, (spec.name, set(names) - global_names)
        trainable = [p for _, p in graphs.train.trainable_parameters()]
        if trainable:
            loss.backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), spec.name
            model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("key", list(TINY))
def test_zoo_model_forward_and_stages(key: str) -> None:
    model = tiny(key)
    assert model.T == TINY[key][1]
    assert all(isinstance(b, nn.Sequential) for b in model.blocks)
    x, _ = batch(model)
    model.eval()
    out = model(x)
    assert out.shape == (len(x), CLASSES)
    assert torch.allclose(model.forward_stage(x, model.T - 1), out)
    for t in range(model.T):
        assert model.forward_stage(x, t).shape == (len(x), CLASSES)
    model.train()
    check_stages(model)


@pytest.mark.parametrize("key", list(TINY))
def test_group_norm(key: str) -> None:
    model = tiny(key, norm="group")
    if key != "vit":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert any(isinstance(m, GroupNorm) for m in model.modules())
    x, _ = batch(model)
    assert model(x).shape == (len(x), CLASSES)


@pytest.mark.parametrize("key", list(TINY))
def test_config_rebuilds_exactly(key: str) -> None:
    model = tiny(key)
    config = json.loads(json.dumps(model.config))  # what the manifest stores
    torch.manual_seed(0)
    again = build_model(**config)
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == config


def test_zoo_keys_and_unknown_model() -> None:
    assert set(ZOO) == {"resnet18", "resnet34", "vgg11", "cnn", "vit"}
    with pytest.raises(ValueError, match="unknown model 'nope': choose from resnet18"):
        build_model("nope")


def test_resnet18_parameter_count() -> None:
    model = build_model("resnet18", num_classes=10)
    count = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.classifier.parameters())
    assert abs(count - 11.17e6) < 0.05e6
    assert model.shapes[1:] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert len(model.blocks[0]) == 3  # stem + 2 units


def test_vgg_28x28_reaches_1x1() -> None:
    assert tiny("vgg11-28").shapes[-1] == (64, 1, 1)


def test_vit_uses_exportable_layers() -> None:
    model = tiny("vit")
    kinds = {type(m) for m in model.modules()}
    assert LayerNorm in kinds
    assert not kinds & {nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.LayerNorm}
    assert model.shapes[1:] == [(16, 32)] * 3


def user_sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
    )


def test_from_sequential() -> None:
    torch.manual_seed(0)
    model = from_sequential(user_sequential(), (3, 16, 16), num_classes=CLASSES, name="mine")
    assert model.T == 3 and model.name == "mine"
    assert all(isinstance(b, nn.Sequential) for b in model.blocks)
    assert isinstance(model.blocks[0][1], GroupNorm)  # swapped for the exportable drop-in
    assert model.classifier.pool == "avg" and model.classifier.fc.in_features == 16
    assert model.shapes[-1] == (16, 4, 4)
    x, _ = batch(model)
    model.eval()
    assert torch.allclose(model.forward_stage(x, model.T - 1), model(x))
    model.train()
    check_stages(model)


@pytest.mark.parametrize(
    ("flatten", "out_shape", "pool", "features"),
    [(nn.Flatten(2), (4, 32), "tokens", 32), (nn.Flatten(1), (32,), "none", 32)],
)
def test_from_sequential_pooling_by_rank(flatten: nn.Module, out_shape: tuple, pool: str, features: int) -> None:
    """Block 0 leaves the image (basic layers only bridge blocks of equal rank); block 1 works on vectors."""
    in_dim = 64 if out_shape == (4, 32) else 256
    seq = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), flatten), nn.Linear(in_dim, 32))
    model = from_sequential(seq, (1, 8, 8), num_classes=CLASSES)
    assert model.shapes[-1] == out_shape
    assert model.classifier.pool == pool and model.classifier.fc.in_features == features
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, CLASSES)


def test_from_sequential_rejects_wrong_input() -> None:
    with pytest.raises(ValueError, match=r"do not accept input shape \[1, 16, 16\]"):
        from_sequential(user_sequential(), (1, 16, 16), num_classes=CLASSES)


@pytest.mark.parametrize("key", ["resnet18", "vgg11", "cnn", "vit"])
def test_unknown_norm_rejected(key: str) -> None:
    with pytest.raises(ValueError, match="unknown norm 'bogus'"):
        tiny(key, norm="bogus")
