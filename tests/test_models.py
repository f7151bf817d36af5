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
            extra = {"labels": y, "inputs": x, "loss_scale": torch.tensor(1.0)}
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


# ---- output modules: the kinds of basic layer ----

@pytest.mark.parametrize("kind", ["linear", "conv", "light"])
@pytest.mark.parametrize("key", ["resnet18", "cnn", "vit"])
def test_config_round_trips_output_module(key: str, kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(key, num_classes=CLASSES, output_module=kind, **TINY[key][0])
    config = json.loads(json.dumps(model.config))
    assert config["output_module"] == kind == model.output_module
    torch.manual_seed(0)
    again = build_model(**config)
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == config and again.output_module == kind
    # the same kind switched on afterwards (as export does) rebuilds the same architecture too
    other = build_model(key, num_classes=CLASSES, **TINY[key][0]).set_output_modules(kind)
    assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in a.items()}


def test_load_model_applies_output_module(tmp_path, monkeypatch) -> None:
    from progfl.models import load_model

    assert load_model("cnn", 10, (1, 28, 28), width=4, output_module="light").output_module == "light"
    (tmp_path / "mymodels_om.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU()),\n"
        "                         nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("mymodels_om:make", 10, (1, 8, 8), output_module="conv")
    assert model.output_module == "conv" and model.config["output_module"] == "conv"
    assert isinstance(model.basics["1"][1], GroupNorm)  # the blocks use GroupNorm: so do the basic layers
    assert load_model("mymodels_om:make", 10, (1, 8, 8), output_module="linear").output_module == "linear"


def test_basic_layer_kinds() -> None:
    from progfl.models import basic_layer

    x = torch.randn(2, 8, 16, 16)
    linear = basic_layer((8, 16, 16), (16, 8, 8), "linear")
    assert isinstance(linear, nn.Conv2d) and linear.bias is not None and linear.stride == (2, 2)
    assert set(dict(linear.named_parameters())) == {"weight", "bias"}  # ProFL's names, as before kinds existed
    conv = basic_layer((8, 16, 16), (16, 8, 8), "conv")
    assert [type(m) for m in conv] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] and conv[0].bias is None
    light = basic_layer((8, 16, 16), (16, 8, 8), "light", "group")
    assert [type(m) for m in light] == [nn.Conv2d, nn.Conv2d, GroupNorm, nn.ReLU]
    assert light[0].groups == 8 and light[0].stride == (2, 2) and light[1].kernel_size == (1, 1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(linear) == 8 * 16 * 9 + 16 and count(conv) == 8 * 16 * 9 + 2 * 16
    assert count(light) == 8 * 9 + 8 * 16 + 2 * 16
    for layer in (linear, conv, light):
        assert layer(x).shape == (2, 16, 8, 8)
    assert basic_layer((8, 7, 7), (8, 4, 4), "light")(torch.randn(2, 8, 7, 7)).shape == (2, 8, 4, 4)
    pooled = basic_layer((8, 5, 5), (8, 4, 4), "conv")  # no stride lands on 4x4: adaptive pool after the ReLU
    assert isinstance(pooled[-1], nn.AdaptiveAvgPool2d) and pooled(torch.randn(2, 8, 5, 5)).shape == (2, 8, 4, 4)
    tokens = basic_layer((4, 16), (4, 32), "conv")
    assert [type(m) for m in tokens] == [nn.Linear, LayerNorm, nn.GELU]
    assert isinstance(basic_layer((4, 16), (4, 32), "linear"), nn.Linear)
    vector = basic_layer((16,), (32,), "light")
    assert [type(m) for m in vector] == [nn.Linear, nn.ReLU]
    with pytest.raises(ValueError, match="unknown output module 'wide'"):
        basic_layer((16,), (32,), "wide")
    with pytest.raises(ValueError, match="no basic layer maps"):
        basic_layer((4, 16), (32,), "conv")


def test_set_output_modules() -> None:
    model = tiny("resnet18")
    assert model.output_module == "conv"  # the default kind
    before = dict(model.basics.named_parameters())
    assert model.set_output_modules("conv") is model and dict(model.basics.named_parameters()) == before  # no-op
    model.set_output_modules("linear")
    assert set(dict(model.basics.named_parameters())) == {f"{k}.{p}" for k in "123" for p in ("weight", "bias")}
    assert model.config["output_module"] == "linear"
    x, _ = batch(model)
    assert model.forward_stage(x, 0).shape == (len(x), CLASSES)
    with pytest.raises(ValueError, match="unknown output module"):
        model.set_output_modules("auto")
    assert tiny("cnn", norm="group").set_output_modules("light").basics["1"][2].__class__ is GroupNorm


def test_distill_keeps_the_frozen_output_module_in_eval_mode() -> None:
    """distill-t fits basic layer t through basics[t+1..] as the teacher runs them: BatchNorm from running
    statistics, which stay where they were (the trained basic layer's own statistics move)."""
    model = tiny("resnet18")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.startswith("basics.") and name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    before = {n: b.clone() for n, b in model.named_buffers() if n.startswith("basics.")}
    g = build_stage(model, default_stages(model.T, ("distill",))[0])  # distill-1
    x, _ = batch(model)
    features = g.prefix(x)
    g.train.train()
    _, logits, _ = g.train(features, torch.zeros(len(x), CLASSES), torch.tensor(1.0))
    after = dict(model.named_buffers())
    assert not torch.equal(after["basics.1.1.running_mean"], before["basics.1.1.running_mean"])
    for k in ("2", "3"):
        assert torch.equal(after[f"basics.{k}.1.running_mean"], before[f"basics.{k}.1.running_mean"])
        assert torch.equal(after[f"basics.{k}.1.running_var"], before[f"basics.{k}.1.running_var"])
    with torch.no_grad():  # the same logits as the frozen tail run by torch in eval mode
        model.basics["1"].train()
        h = model.basics["1"](features)
        model.basics["2"].eval(), model.basics["3"].eval()
        expected = model.classifier(model.basics["3"](model.basics["2"](h)))
    torch.testing.assert_close(logits, expected)
