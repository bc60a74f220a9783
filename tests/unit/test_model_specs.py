"""Model specs (built-in, torchvision:, timm:, package.module:factory) and starting weights. In-process."""

import sys
import textwrap

import pytest
import torch

from dist_cnn.errors import UserError
from dist_cnn.models.registry import build_model, check_spec, factory_kwargs, object_spec, parse_spec
from dist_cnn.models.weights import hub_file, init_from, load_into, load_pretrained


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A package of the user's own models, importable from the current directory (as the CLI finds it)."""
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn

        class Tiny(nn.Module):
            def __init__(self, in_channels, num_classes, image_size):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.head = nn.Linear(8, num_classes)

            def forward(self, x):
                return self.head(self.body(x))

        def build(num_classes):          # takes only what it needs
            return Tiny(3, num_classes, 32)

        def not_a_model(**kwargs):
            return "hello"

        def broken(num_classes):
            raise ValueError("width must be even")

        WIDTH = 3
        """)
    )
    monkeypatch.chdir(tmp_path)
    yield "mynets.nets"
    for name in [m for m in sys.modules if m.startswith("mynets")]:
        del sys.modules[name]


def one_line_error(fn, *args, match=None):
    with pytest.raises(UserError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_parse_spec_forms():
    assert parse_spec("seed").kind == "builtin"
    assert parse_spec("torchvision:resnet50") == parse_spec("torchvision:resnet50")
    tv = parse_spec("torchvision:resnet50")
    assert (tv.kind, tv.name) == ("torchvision", "resnet50")
    assert parse_spec("timm:resnet18").kind == "timm"
    assert parse_spec("my_pkg.my_mod:build").kind == "module"
    assert parse_spec("my_pkg.my_mod:Outer.build").kind == "module"
    for bad in ("vgg", "torchvision:", "my-pkg:build", "a:b:c", ":build"):
        msg = one_line_error(parse_spec, bad, match="unknown model")
        assert "torchvision:NAME" in msg and "seed" in msg


def test_user_module_factory_and_class(user_module):
    m = build_model(f"{user_module}:build", 3, 7, 32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    m = build_model(f"{user_module}:Tiny", 1, 4, 16)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_user_module_errors_are_one_line(user_module):
    one_line_error(check_spec, "no_such_pkg.mod:build", match="no module 'no_such_pkg'")
    one_line_error(check_spec, f"{user_module}:missing", match="has no attribute 'missing'")
    one_line_error(check_spec, f"{user_module}:WIDTH", match="not a factory")
    one_line_error(build_model, f"{user_module}:not_a_model", 3, 10, 32, match="returned a str, not a torch.nn.Module")
    one_line_error(build_model, f"{user_module}:broken", 3, 10, 32, match="ValueError: width must be even")


def test_factory_gets_the_keywords_it_names():
    def f(num_classes, image_size=0):
        pass

    def g(**kw):
        pass

    avail = dict(in_channels=3, num_classes=10, image_size=32)
    assert factory_kwargs(f, **avail) == {"num_classes": 10, "image_size": 32}
    assert factory_kwargs(g, **avail) == avail


@pytest.mark.parametrize("module", ["dist_cnn.models", "dist_cnn.models.registry", "dist_cnn.models.seed"])
def test_specs_recorded_by_earlier_layouts_still_build(module):
    assert isinstance(build_model(f"{module}:SeedNet", 3, 10, 32), torch.nn.Module)


def test_object_spec():
    from dist_cnn.models.registry import SeedNet, seed

    assert object_spec(seed) == "dist_cnn.models.seed:seed"
    assert object_spec(SeedNet) == "dist_cnn.models.seed:SeedNet"
    assert object_spec(SeedNet()) == "python:dist_cnn.models.seed.SeedNet"  # an instance: its arguments are unknown
    assert object_spec(lambda **kw: None).startswith("python:")


def test_torchvision_models():
    m = build_model("torchvision:mobilenet_v3_small", 3, 10, 32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("torchvision:resnet18", 3, 5, 32).fc.out_features == 5
    one_line_error(build_model, "torchvision:inception_v3", 3, 10, 32, match="at least 75x75 pixels")
    one_line_error(build_model, "torchvision:resnet18", 1, 10, 28, match="3-channel")
    one_line_error(check_spec, "torchvision:resnet51", match="no classification model 'resnet51'.*resnet50")
    one_line_error(check_spec, "torchvision:fasterrcnn_resnet50_fpn", match="no classification model")


def test_torchvision_vit_is_built_for_the_image_size():
    m = build_model("torchvision:vit_b_32", 3, 10, 64)
    assert m.image_size == 64
    one_line_error(build_model, "torchvision:vit_b_32", 3, 10, 40, match="divisible by its patch size 32")


def test_timm_model_or_one_line_without_timm(monkeypatch):
    try:
        import timm  # noqa: F401

        m = build_model("timm:resnet18", 1, 6, 32)
        assert m(torch.randn(2, 1, 32, 32)).shape == (2, 6)
        one_line_error(check_spec, "timm:no_such_net", match="timm has no model")
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm sees
    one_line_error(check_spec, "timm:resnet18", match=r"pip install 'dist_cnn\[timm\]'")


def test_pretrained_from_the_hub_cache_reinitializes_another_head(tmp_path, monkeypatch, logged):
    import torchvision

    from dist_cnn.models.registry import tv_weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    path = hub_file(tv_weights("resnet18").url)
    model = build_model("torchvision:resnet18", 3, 10, 32)
    msg = one_line_error(load_pretrained, model, "torchvision:resnet18", 10, 3)
    assert str(path) in msg and "https://download.pytorch.org/models/resnet18-" in msg
    # a file in torchvision's layout (1000 ImageNet classes), where torch.hub would have put it
    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    head_before = model.fc.weight.clone()
    load_pretrained(model, "torchvision:resnet18", 10, 3)
    assert torch.equal(model.conv1.weight, ref.conv1.weight) and torch.equal(
        model.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var
    )
    assert torch.equal(model.fc.weight, head_before) and model.fc.out_features == 10
    assert logged == [
        "torchvision:resnet18 weights: classifier head fc re-initialized for 10 classes (the weights have 1000)"
    ]
    one_line_error(load_pretrained, build_model("seed", 3, 10, 32), "seed", 10, 3, match="--init-from")


def test_init_from_replaces_a_head_and_refuses_other_mismatches(tmp_path, logged):
    torch.manual_seed(0)
    src = build_model("seed", 3, 10, 32)
    torch.save({"model": src.state_dict(), "config": {}}, tmp_path / "model.pt")
    dst = build_model("seed", 3, 4, 32)
    init_from(dst, str(tmp_path / "model.pt"), 4)
    assert torch.equal(dst.conv1.weight, src.conv1.weight) and torch.equal(dst.fc2.bias, src.fc2.bias)
    assert dst.fc3.weight.shape == (4, 84) and "fc3 re-initialized for 4 classes (the weights have 10)" in logged[0]
    same = build_model("seed", 3, 10, 32)
    logged.clear()
    init_from(same, str(tmp_path / "model.pt"), 10)
    assert logged == [] and torch.equal(same.fc3.weight, src.fc3.weight)
    # another image size changes fc1: not a head, an error
    one_line_error(
        init_from,
        build_model("seed", 3, 10, 16),
        str(tmp_path / "model.pt"),
        10,
        match=r"fc1.weight is \(120, 2048\) there, \(120, 512\) here",
    )
    one_line_error(
        init_from,
        build_model("resnet18", 3, 10, 32),
        str(tmp_path / "model.pt"),
        10,
        match="do not fit this model: .* missing here",
    )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    one_line_error(init_from, build_model("seed", 3, 10, 32), str(tmp_path / "junk.pt"), 10, match="unreadable")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    one_line_error(
        init_from,
        build_model("seed", 3, 10, 32),
        str(tmp_path / "other.pt"),
        10,
        match="not a dist_cnn model.pt",
    )


def test_load_into_two_mismatched_modules_is_an_error():
    a, b = build_model("seed", 3, 10, 32), build_model("seed", 3, 10, 32)
    state = dict(a.state_dict())
    state["fc2.weight"] = torch.zeros(84, 99)
    state["fc3.weight"] = torch.zeros(3, 84)
    one_line_error(load_into, b, state, 10, "x", match="do not fit")
