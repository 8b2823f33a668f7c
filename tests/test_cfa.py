"""CFA: loss values by hand, descriptor, memory bank, model selection, end-to-end floors."""

import numpy as np
import pytest
import torch

from patchcore_lite.datasets import train_test_samples
from patchcore_lite.errors import ConfigError, DataError
from patchcore_lite.evaluation import evaluate, fit_evaluate
from patchcore_lite.methods.cfa import (
    CFA,
    CFAConfig,
    PatchDescriptor,
    cfa_loss,
    coordinate_channels,
    cut_paste,
    greedy_nearest,
    nearest_squared,
    paper_memory_bank,
    softmin_score,
    split_indices,
)
from patchcore_lite.teaching.hypersphere import (
    hypersphere_radius_view,
    hypersphere_toy,
    hypersphere_view,
    inside_repulsion,
)


def test_losses_by_hand():
    # K = J = 2, r = 1, alpha = 0.1, nu = 1e-3; rows are ascending squared distances.
    dist_sq = torch.tensor([[0.25, 0.5, 0.6, 3.0], [1.5, 2.0, 2.5, 4.0]])
    r = torch.tensor(1.0, requires_grad=True)
    att, rep = cfa_loss(dist_sq, r, k=2, alpha=0.1, nu=1e-3)
    # L_att: max(0, d - 1) over the first two columns = 0, 0, 0.5, 1.0 -> mean 0.375
    # L_rep: max(0, 1 - d - 0.1) over the last two = 0.3, 0, 0, 0 -> mean 0.075
    assert att.item() == pytest.approx(375.0, rel=1e-6)
    assert rep.item() == pytest.approx(75.0, rel=1e-6)
    # dL/dr: attraction grows r (-2r per active term), repulsion shrinks it (+2r per active term)
    (att_grad,) = torch.autograd.grad(att, r, retain_graph=True)
    (rep_grad,) = torch.autograd.grad(rep, r)
    assert att_grad.item() == pytest.approx(-2 * 2 / 4 / 1e-3, rel=1e-6)
    assert rep_grad.item() == pytest.approx(2 * 1 / 4 / 1e-3, rel=1e-6)


def test_repulsion_is_off_while_r_squared_is_below_alpha():
    # the official start r = 1e-5: no distance >= 0 can make r^2 - d - alpha positive
    att, rep = cfa_loss(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]), 1e-5)
    assert rep.item() == 0.0 and att.item() == 0.0
    _, rep = cfa_loss(torch.zeros(1, 6), 0.5)  # r^2 = 0.25 > alpha: hard negatives at 0 are pushed
    assert rep.item() == pytest.approx((0.25 - 0.1) / 1e-3)


def test_nearest_squared_matches_brute_force_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=gen)
    phi = torch.randn(30, 8, generator=gen, requires_grad=True)
    ours = nearest_squared(phi, bank, 5, chunk=7)
    dense = (torch.cdist(phi, bank) ** 2).topk(5, dim=1, largest=False).values
    assert torch.allclose(ours, dense, atol=1e-4)
    w = torch.rand(30, 5, generator=gen)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), phi)
    (g_dense,) = torch.autograd.grad((dense * w).sum(), phi)
    assert torch.allclose(g_ours, g_dense, atol=1e-4)


def test_softmin_score_by_hand():
    d = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    e = np.exp(-np.array([1.0, 2.0, 3.0]))
    expected = [e[0] / e.sum() * 1.0, 2.0 / 3]  # equal distances: certainty 1/K
    assert softmin_score(d).tolist() == pytest.approx(expected, rel=1e-6)


def test_descriptor_shapes_and_coordinate_channels():
    coords = coordinate_channels(5, 7)
    assert coords.shape == (5, 7, 2)
    assert coords[0, 0].tolist() == [-1, -1] and coords[-1, -1].tolist() == [1, 1]
    assert torch.allclose(coords[:, 3, 0], torch.linspace(-1, 1, 5))  # channel 0: row
    assert torch.allclose(coords[2, :, 1], torch.linspace(-1, 1, 7))  # channel 1: column
    assert PatchDescriptor(176, gamma_d=4)(torch.randn(2, 5, 7, 176)).shape == (2, 5, 7, 44)
    # the coordinates enter as the last two input channels of the 1 x 1 convolution
    phi = PatchDescriptor(3)
    with torch.no_grad():
        phi.layer.weight.zero_()
        phi.layer.bias.zero_()
        phi.layer.weight[0, 3] = phi.layer.weight[1, 4] = 1
    out = phi(torch.randn(1, 5, 7, 3))
    assert torch.allclose(out[0, ..., :2], coords) and out[0, ..., 2].abs().max() == 0


def _tiny(**overrides) -> CFA:
    """A small CFA on 64 x 64 inputs (a 16 x 16 grid) with a random backbone: seconds on a CPU."""
    settings = {"pretrained": False, "resize": 64, "crop": None, "epochs": 0, "val_fraction": 0.0} | overrides
    return CFA(**settings)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_memory_bank_is_the_mean_per_position_whatever_the_number_of_images():
    images = _images(6)
    model = _tiny().fit(images, progress=False)
    assert model.memory_bank.shape == (16 * 16, 24 + 40 + 112)
    expected = model.descriptor(model.extract(images)).mean(dim=0).flatten(0, 1)
    assert torch.allclose(model.memory_bank, expected, atol=1e-5)
    doubled = _tiny().fit(torch.cat([images, images]), progress=False)
    assert torch.allclose(doubled.memory_bank, model.memory_bank, atol=1e-6)
    assert doubled.memory_bytes == model.memory_bytes


def _greedy_by_hand(bank: np.ndarray, candidates: np.ndarray) -> list[int]:
    """Algorithm 1's inner loop, literally: memory vector j takes argmin over Y = candidates not yet taken."""
    taken: list[int] = []
    for c in bank:
        free = [t for t in range(len(candidates)) if t not in taken]
        taken.append(min(free, key=lambda t: float(((candidates[t] - c) ** 2).sum())))
    return taken


def test_greedy_nearest_takes_each_candidate_once_in_memory_order():
    # Both memory vectors are nearest to candidate 0; the first takes it, the second gets its next best.
    bank = np.array([[0.0], [0.4]])
    candidates = np.array([[0.1], [1.0], [-0.5]])
    assert greedy_nearest(bank, candidates).tolist() == [0, 1]
    rng = np.random.default_rng(0)
    for m, t, d in ((20, 20, 3), (40, 60, 2), (200, 200, 4)):  # 200 x 200: rows run out of their 16 nearest
        b, c = rng.normal(size=(m, d)), rng.normal(size=(t, d))
        assert greedy_nearest(b, c).tolist() == _greedy_by_hand(b, c)
    with pytest.raises(ValueError, match="at least as many"):
        greedy_nearest(np.zeros((3, 2)), np.zeros((2, 2)))


def test_paper_memory_bank_is_an_ema_of_matched_vectors_by_hand():
    # 1-D, two vectors an image. C_0 = image 0; image 0 matches itself (no change);
    # image 1: 0 -> 1 and 10 -> 11, so with beta = 0.5 the bank is [0.5, 10.5].
    phi = torch.tensor([[[0.0], [10.0]], [[1.0], [11.0]]])
    assert paper_memory_bank(phi, 2, beta=0.5).flatten().tolist() == pytest.approx([0.5, 10.5])
    # beta = 1: the bank is the last image's matched vectors, here in swapped order of the grid.
    swapped = torch.tensor([[[0.0], [10.0]], [[11.0], [1.0]]])
    assert paper_memory_bank(swapped, 2, beta=1.0).flatten().tolist() == pytest.approx([1.0, 11.0])


def test_paper_memory_bank_depends_on_image_order_unlike_the_position_mean():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(5, 12, 3, generator=gen)
    bank = paper_memory_bank(phi, 12, beta=0.3)
    assert bank.shape == (12, 3) and bank.dtype == phi.dtype
    reordered = paper_memory_bank(phi.flip(0), 12, beta=0.3)
    assert not torch.allclose(bank, reordered)
    assert torch.allclose(phi.mean(0), phi.flip(0).mean(0))  # the official bank ignores the order
    # identical images: C_0 is that image and every EMA step keeps it (the fixed point)
    same = phi[:1].expand(4, -1, -1)
    assert torch.allclose(paper_memory_bank(same, 12, beta=0.5), phi[0], atol=1e-6)
    # fewer vectors: K-means of the first image, deterministic for a seed
    small = [paper_memory_bank(phi, 4, beta=0.3, seed=1) for _ in range(2)]
    assert small[0].shape == (4, 3) and torch.equal(small[0], small[1])
    with pytest.raises(ValueError, match="n_vectors = 13"):
        paper_memory_bank(phi, 13)
    with pytest.raises(ConfigError, match="beta"):
        paper_memory_bank(phi, 12, beta=0.0)


def test_cfa_with_the_papers_bank():
    images = _images(4)
    model = _tiny(bank="kmeans_ema", gamma_c=4, gamma_d=2, beta=0.5).fit(images, progress=False)
    assert model.memory_bank.shape == (16 * 16 // 4, 176 // 2)
    again = _tiny(bank="kmeans_ema", gamma_c=4, gamma_d=2, beta=0.5).fit(images, progress=False)
    assert torch.equal(model.memory_bank, again.memory_bank)
    official = _tiny(gamma_c=4, gamma_d=2).fit(images, progress=False)
    assert not torch.allclose(model.memory_bank, official.memory_bank)
    with pytest.raises(ConfigError, match="bank = 'paper'"):
        CFAConfig(bank="paper")
    with pytest.raises(ConfigError, match="beta"):
        CFAConfig(beta=1.5)


def test_wide_resnet_features_have_the_papers_1792_channels():
    model = _tiny(backbone="wide_resnet50_2").fit(_images(2), progress=False)  # random weights: offline
    assert model.memory_bank.shape == (16 * 16, 256 + 512 + 1024)


def test_gamma_c_compresses_the_bank_deterministically():
    images = _images(4)
    banks = [_tiny(gamma_c=4, gamma_d=2).fit(images, progress=False).memory_bank for _ in range(2)]
    assert banks[0].shape == (16 * 16 // 4, 176 // 2)
    assert torch.equal(banks[0], banks[1])
    assert _tiny(gamma_c=4).fit(images, progress=False).memory_bytes < _tiny().fit(images, progress=False).memory_bytes


def test_training_is_deterministic_and_keeps_the_best_epoch():
    images = _images(10)
    runs = [_tiny(epochs=3, val_fraction=0.3).fit(images, progress=False) for _ in range(2)]
    np.testing.assert_equal(runs[0].history, runs[1].history)  # NaN losses of epoch 0 compare equal
    assert torch.equal(runs[0].score_batch(images[:2])[1], runs[1].score_batch(images[:2])[1])
    history = runs[0].history
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    scores = [h["val_score"] for h in history]
    assert runs[0].best_epoch == int(np.argmax(scores))  # first of equal maxima
    # Training for exactly best_epoch epochs replays the same batches: the kept state is that one.
    replay = _tiny(epochs=runs[0].best_epoch, val_fraction=0.3).fit(images, progress=False)
    for a, b in zip(runs[0].descriptor.parameters(), replay.descriptor.parameters()):
        assert torch.equal(a, b)


def test_radius_is_learned_only_when_asked():
    images = _images(4)
    learned = _tiny(epochs=2).fit(images, progress=False)
    fixed = _tiny(epochs=2, learn_radius=False).fit(images, progress=False)
    assert learned.radius.item() > 1e-3  # AdamW moves it by about lr per step while L_att > 0
    assert fixed.radius.item() == pytest.approx(1e-5)
    assert [h["radius"] for h in learned.history] == sorted(h["radius"] for h in learned.history)


def test_loss_terms_train_on_the_chosen_term_only():
    images = _images(4)
    # L_rep alone at the official start (r^2 << alpha): no active term, zero gradient, so AdamW's
    # update is 0 and only its decoupled weight decay moves the weights: w * (1 - lr * wd) per step.
    start = _tiny(learn_radius=False, loss_terms="rep")
    before = [p.detach().clone() for p in start.descriptor.parameters()]
    rep_only = _tiny(epochs=2, learn_radius=False, loss_terms="rep").fit(images, progress=False)
    steps = 2 * 1  # 2 epochs of one batch (4 images, batch 4)
    decay = (1 - rep_only.config.lr * rep_only.config.weight_decay) ** steps
    for b, a in zip(before, rep_only.descriptor.parameters()):
        assert torch.allclose(a, b * decay, rtol=1e-5, atol=1e-7)
    assert all(h["l_rep"] == 0 for h in rep_only.history[1:]) and rep_only.history[-1]["l_att"] > 0
    # L_att alone moves the weights by far more than the decay, and both terms are still measured.
    att_only = _tiny(epochs=2, learn_radius=False, loss_terms="att").fit(images, progress=False)
    moved = max((a - b * decay).abs().max().item() for b, a in zip(before, att_only.descriptor.parameters()))
    assert moved > 1e-4 and att_only.history[2]["l_att"] < att_only.history[1]["l_att"]
    with pytest.raises(ConfigError, match="loss_terms"):
        CFAConfig(loss_terms="both")


def test_score_batch_shapes_and_errors():
    with pytest.raises(RuntimeError, match="fit"):
        _tiny().score_batch(_images(1))
    with pytest.raises(ValueError, match="empty"):
        _tiny().fit(torch.empty(0, 3, 64, 64))
    with pytest.raises(ConfigError, match="val_fraction = 1.0: must be in"):
        CFAConfig(val_fraction=1.0)
    scores, maps = _tiny().fit(_images(3), progress=False).score_batch(_images(2, seed=1))
    assert scores.shape == (2,) and maps.shape == (2, 64, 64)
    assert torch.allclose(scores, maps.flatten(1).amax(dim=1))


def test_split_and_cut_paste():
    train, val = split_indices(10, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_indices(10, 0.2, seed=3) == (train, val)
    assert split_indices(1, 0.0) == ([0], [])
    images = _images(3)
    pasted, masks = cut_paste(images, copies=2, seed=0)
    assert pasted.shape == (6, 3, 64, 64) and masks.shape == (6, 64, 64)
    originals = images.repeat(2, 1, 1, 1)
    outside = ~masks.bool()[:, None].expand_as(pasted)
    assert torch.equal(pasted[outside], originals[outside])  # only the rectangle changes
    area = masks.flatten(1).mean(dim=1)
    assert ((area > 0.005) & (area < 0.2)).all()
    assert all((pasted[i] != originals[i]).any() for i in range(6))


def test_toy_attraction_empties_the_loss():
    run = hypersphere_toy(steps=40)
    assert run.path.shape == (41, 60, 2)
    assert run.l_att[0] > 0.1 and run.l_rep[0] > 0  # both forces act at the start
    assert run.l_att[-1] < 1e-3 and run.l_rep[-1] < 1e-3
    _, start = hypersphere_view(run, 0)
    _, end = hypersphere_view(run, 40)
    assert start["pulled"] > 0 and start["pushed"] > 0 and end["pulled"] == end["pushed"] == 0


def test_toy_repulsion_needs_r_squared_above_alpha_and_sorts_ambiguous_points():
    _, small = hypersphere_radius_view(0.3)  # r^2 < alpha: no repulsion sphere
    assert small["max_l_rep"] == 0 and small["pushed_at_start"] == 0 and small["r2_minus_alpha"] < 0
    _, large = hypersphere_radius_view(0.6)
    assert large["max_l_rep"] > 0 and large["pushed_at_start"] > 0 and large["l_rep_end"] < 1e-3
    # ablation: attraction alone leaves points inside a second vector's repulsion sphere; with L_rep none
    att_only, both = hypersphere_toy(steps=40, j=0), hypersphere_toy(steps=40, j=1)
    assert max(att_only.l_rep) == 0
    assert inside_repulsion(att_only.path[-1], att_only.memory, 0.6, 0.1) > 0
    assert inside_repulsion(both.path[-1], both.memory, 0.6, 0.1) == 0
    assert inside_repulsion(both.path[0], both.memory, 0.3, 0.1) == 0  # no sphere while r^2 <= alpha


def test_synthetic_category_end_to_end(synthetic_root):
    result = fit_evaluate(CFA(), synthetic_root / "disc", progress=False)
    # measured with the defaults (3 epochs): image 0.865, pixel 0.985, AUPRO 0.917; floors with margin
    assert result.metrics["image_auroc"] >= 0.8
    assert result.metrics["pixel_auroc"] >= 0.95
    assert result.metrics["aupro"] >= 0.88


def test_reduced_hazelnut_end_to_end(mvtec_reduced):
    train, test = train_test_samples(mvtec_reduced("hazelnut"))
    model = CFA().fit(train[:12], progress=False)  # 10 for the bank and training, 2 held out
    result = evaluate(model, test, progress=False)
    # measured: image 1.0 (2 normal test images: steps of 1/16), pixel 0.988, AUPRO 0.952
    assert result.metrics["image_auroc"] >= 0.8
    assert result.metrics["pixel_auroc"] >= 0.96
    assert result.metrics["aupro"] >= 0.9


def test_validation_split_that_cannot_work_is_refused_before_training():
    with pytest.raises(ConfigError, match="val_anomalies = 0.*val_fraction"):
        CFAConfig(val_anomalies=0)  # held-out normals only: no validation AUROC
    CFAConfig(val_anomalies=0, val_fraction=0.0)  # no validation split: nothing to paste
    model = _tiny(val_fraction=0.2)
    model.extract = None  # any feature extraction would fail: the refusal must come first
    with pytest.raises(DataError, match="val_fraction = 0.2 of 2 training images holds out 0"):
        model.fit(_images(2), progress=False)
    with pytest.raises(DataError, match="val_fraction = 0.9 of 2 training images holds out 2"):
        _tiny(val_fraction=0.9).fit(_images(2), progress=False)
