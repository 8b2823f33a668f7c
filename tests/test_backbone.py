"""Backbones: stages, early stop, weights loading and its errors."""

from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from patchcore_lite.backbone import Backbone, check_backbone
from patchcore_lite.errors import ConfigError, ModelFileError, WeightsNotFoundError


@pytest.mark.parametrize(
    "name, channels",
    [("efficientnet_lite0", [40, 112]), ("wide_resnet50_2", [512, 1024]), ("resnet18", [128, 256])],
)
def test_stage_aliases_give_stride_8_and_16(name, channels):
    net = Backbone(name, pretrained=False)
    assert net.channels == channels
    assert net.strides == [8, 16]
    maps = net(torch.zeros(2, 3, 96, 128))
    assert [m.shape for m in maps] == [(2, channels[0], 12, 16), (2, channels[1], 6, 8)]


def test_forward_stops_after_last_needed_stage():
    net = Backbone("efficientnet_lite0", layers=("layer1", "layer2"), pretrained=False)
    ran = []
    net.net.blocks[3].register_forward_hook(lambda *_: ran.append(True))
    net(torch.zeros(1, 3, 64, 64))
    assert ran == []
    assert isinstance(net.net.conv_head, torch.nn.Identity)  # dropped, costs no memory


def test_random_init_is_seeded():
    a = Backbone("resnet18", pretrained=False, seed=0).fingerprint()
    assert a == Backbone("resnet18", pretrained=False, seed=0).fingerprint()
    assert a != Backbone("resnet18", pretrained=False, seed=1).fingerprint()


def test_offline_efficientnet_weights_load():
    pretrained = Backbone("efficientnet_lite0")
    assert pretrained.fingerprint() != Backbone("efficientnet_lite0", pretrained=False).fingerprint()
    assert pretrained.mean == (0.5, 0.5, 0.5)
    # ImageNet features of a flat grey image are not degenerate (weights really loaded)
    out = pretrained(torch.zeros(1, 3, 64, 64))[1]
    assert out.abs().mean() > 0.01


def test_unknown_names_are_explained():
    with pytest.raises(ConfigError, match="backbone = 'vgg99': must be one of efficientnet_lite0, "):
        Backbone("vgg99")
    with pytest.raises(ConfigError, match=r"stages of resnet18 \(unknown: layer9\)"):
        Backbone("resnet18", layers=("layer9",), pretrained=False)
    with pytest.raises(ConfigError, match="unknown: blocks.99"):
        check_backbone("efficientnet_lite0", ("layer2", "blocks.99"))
    with pytest.raises(ConfigError, match="non-empty"):
        check_backbone("resnet18", ())
    check_backbone("efficientnet_lite0", ("blocks.3", "layer3"))  # a module name, checked on the architecture


def _resnet_stages(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """layer2 and layer3 of a torchvision ResNet, run module by module (no folding)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    l2 = net.layer2(net.layer1(x))
    return [l2, net.layer3(l2)]


def test_weights_path_loads_the_file_and_folding_keeps_the_function(tmp_path: Path):
    torch.manual_seed(3)
    full = __import__("torchvision").models.resnet18(weights=None).eval()
    for bn in full.modules():  # non-trivial statistics, so folding has something to fold
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-1, 1)
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    net = Backbone("resnet18", weights_path=path)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.net.modules())  # all folded
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for ours, ref in zip(net(x), _resnet_stages(full, x)):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_fingerprint_is_of_the_weights_as_loaded_not_folded():
    """Models saved before folding existed must still load: same checksum."""
    torch.manual_seed(0)  # Backbone seeds its random init the same way
    unfolded = __import__("torchvision").models.resnet18(weights=None)
    kept = [p for n, p in unfolded.named_parameters() if not n.startswith(("layer4", "fc"))]
    with torch.no_grad():
        assert Backbone("resnet18", pretrained=False, seed=0).fingerprint() == float(sum(p.double().abs().sum() for p in kept))


def test_bad_weights_files_are_refused(tmp_path: Path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelFileError, match="garbage.pth"):
        Backbone("resnet18", weights_path=garbage)
    pickled = tmp_path / "object.pth"
    torch.save({"model": Path("x")}, pickled)  # arbitrary objects need unpickling: refused
    with pytest.raises(ModelFileError, match="object.pth"):
        Backbone("resnet18", weights_path=pickled)
    with pytest.raises(WeightsNotFoundError, match="missing.pth"):
        Backbone("resnet18", weights_path=tmp_path / "missing.pth")


def test_offline_torchvision_download_says_where_to_put_the_file(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsNotFoundError) as err:
        Backbone("wide_resnet50_2")
    message = str(err.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert "checkpoints" in message and "--weights" in message


def test_folding_keeps_the_default_backbones_features():
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    folded, plain = Backbone("efficientnet_lite0"), Backbone("efficientnet_lite0", fold=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.net.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.net.modules())
    assert folded.fingerprint() == plain.fingerprint()
    with torch.no_grad():
        for a, b in zip(folded(x), plain(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
