"""Locally aware patch features (eq. 1-3), both constructions."""

import pytest
import torch
import torch.nn.functional as F

from patchcore_lite.patches import align, local_aggregate, patch_features


def test_patch_size_one_is_identity():
    x = torch.randn(2, 5, 7, 9)
    assert torch.equal(local_aggregate(x, 1), x)


def test_neighbourhood_mean_with_zero_padding():
    x = torch.randn(1, 2, 6, 6)
    out = local_aggregate(x, 3)
    assert out.shape == x.shape
    assert torch.allclose(out[0, :, 2, 3], x[0, :, 1:4, 2:5].mean(dim=(1, 2)), atol=1e-6)
    # corner: 4 real values and 5 zeros of padding, divided by 9 as the official unfold
    assert torch.allclose(out[0, :, 0, 0], x[0, :, :2, :2].sum(dim=(1, 2)) / 9, atol=1e-6)


def test_stride_shrinks_the_grid():
    assert local_aggregate(torch.randn(1, 1, 28, 28), 3, 2).shape[-2:] == (14, 14)
    with pytest.raises(ValueError):
        local_aggregate(torch.randn(1, 1, 4, 4), 0)


def test_align_upsamples_coarse_to_fine():
    fine, coarse = torch.randn(1, 3, 28, 28), torch.ones(1, 4, 14, 14)
    a, b = align([fine, coarse])
    assert a is fine and b.shape == (1, 4, 28, 28)
    assert torch.allclose(b, torch.ones_like(b))  # bilinear keeps a constant map constant


def test_avgpool_features_concatenate_channels():
    maps = [torch.randn(2, 40, 28, 28), torch.randn(2, 112, 14, 14)]
    feats = patch_features(maps, 3)
    assert feats.shape == (2, 28, 28, 152)
    assert torch.allclose(feats[..., :40], local_aggregate(maps[0]).permute(0, 2, 3, 1))


def _official_reference(features, patchsize, stride, pre_dim, target_dim):
    """patchcore-inspection's PatchCore._embed (PatchMaker, MeanMapper, Aggregator), transcribed."""
    padding = int((patchsize - 1) / 2)
    unfolder = torch.nn.Unfold(kernel_size=patchsize, stride=stride, padding=padding, dilation=1)
    patched, shapes = [], []
    for f in features:
        u = unfolder(f)
        shapes.append([int((s + 2 * padding - (patchsize - 1) - 1) / stride + 1) for s in f.shape[-2:]])
        u = u.reshape(*f.shape[:2], patchsize, patchsize, -1).permute(0, 4, 1, 2, 3)
        patched.append(u)
    ref = shapes[0]
    for i in range(1, len(patched)):
        f = patched[i].reshape(patched[i].shape[0], shapes[i][0], shapes[i][1], *patched[i].shape[2:])
        f = f.permute(0, -3, -2, -1, 1, 2)
        base = f.shape
        f = f.reshape(-1, *f.shape[-2:])
        f = F.interpolate(f.unsqueeze(1), size=(ref[0], ref[1]), mode="bilinear", align_corners=False).squeeze(1)
        f = f.reshape(*base[:-2], ref[0], ref[1]).permute(0, -2, -1, 1, 2, 3)
        patched[i] = f.reshape(len(f), -1, *f.shape[-3:])
    flat = [x.reshape(-1, *x.shape[-3:]) for x in patched]
    mapped = torch.stack([F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pre_dim).squeeze(1) for x in flat], dim=1)
    return F.adaptive_avg_pool1d(mapped.reshape(len(mapped), 1, -1), target_dim).reshape(len(mapped), -1)


@pytest.mark.parametrize("patchsize, stride", [(3, 1), (5, 1), (3, 2)])
def test_official_mode_matches_official_code(patchsize, stride):
    torch.manual_seed(0)
    maps = [torch.randn(2, 16, 12, 12), torch.randn(2, 24, 6, 6)]
    ours = patch_features(maps, patchsize, stride, mode="official", embed_dim=64, target_dim=48)
    ref = _official_reference(maps, patchsize, stride, 64, 48)
    assert ours.shape[-1] == 48
    assert torch.allclose(ours.reshape(-1, 48), ref, atol=1e-5)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown feature mode"):
        patch_features([torch.randn(1, 1, 4, 4)], mode="max")


@pytest.mark.parametrize("mode", ["avgpool", "official"])
def test_grid_puts_patches_on_a_coarser_stage_grid(mode):
    """grid=1: the finer stage is brought down to the coarser grid, the coarser stage kept as it is;
    at a factor of 2 bilinear downsampling is the mean of each 2 x 2 block."""
    fine, coarse = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    out = patch_features([fine, coarse], patch_size=1, mode=mode, embed_dim=10, target_dim=10, grid=1)
    assert out.shape[:3] == (2, 4, 4)
    if mode == "avgpool":
        torch.testing.assert_close(out[..., :4], F.avg_pool2d(fine, 2).permute(0, 2, 3, 1))
        torch.testing.assert_close(out[..., 4:], coarse.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="grid"):
        patch_features([fine, coarse], grid=2, mode=mode)


def test_grid_layer_config_and_model_features():
    from patchcore_lite.errors import ConfigError
    from patchcore_lite.model import PatchCore, PatchCoreConfig

    with pytest.raises(ConfigError, match="grid_layer"):
        PatchCoreConfig(layers=("layer2", "layer3"), grid_layer="layer1")
    model = PatchCore(layers=("layer1", "layer2", "layer3"), grid_layer="layer2", pretrained=False)
    feats = model.extract(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 8, 8, sum(model.backbone.channels))  # the stride-8 grid, all three stages
