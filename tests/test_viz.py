"""Figures: returned (never shown), titled, labelled, with legends, and inputs checked."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.figure import Figure

from patchcore_lite.metrics import aupro
from patchcore_lite.teaching import viz

RNG = np.random.default_rng(0)
IMAGES = RNG.random((5, 16, 20, 3))
MAPS = RNG.random((5, 16, 20)).astype(np.float32)
MASKS = np.zeros((5, 16, 20), dtype=bool)
MASKS[:2, 3:7, 4:9] = True
LABELS = np.array([1, 1, 0, 0, 0])
SCORES = np.array([0.9, 0.4, 0.5, 0.1, 0.2])


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_overlay_draws_map_mask_and_colour_bar():
    fig = viz.overlay(IMAGES[0], MAPS[0], MASKS[0], title="bottle 000")
    assert isinstance(fig, Figure)
    ax, colour_bar = fig.axes
    assert ax.get_title() == "bottle 000" and colour_bar.get_ylabel() == "anomaly score"
    assert len(ax.images) == 2 and legend_texts(ax) == ["ground truth"]
    assert ax.collections, "the mask outline is drawn as a contour"


def test_overlay_on_given_axes_with_grey_image_and_empty_mask():
    ax = Figure().add_subplot()
    assert viz.overlay(IMAGES[0, :, :, 0], MAPS[0], np.zeros((16, 20)), ax=ax) is ax.figure
    assert not ax.collections  # nothing to outline


def test_overlay_checks_shapes_and_range():
    with pytest.raises(ValueError, match="does not match"):
        viz.overlay(IMAGES[0], MAPS[0, :, :10])
    with pytest.raises(ValueError, match="mask shape"):
        viz.overlay(IMAGES[0], MAPS[0], MASKS[0, :10])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        viz.overlay(IMAGES[0] * 255, MAPS[0])
    with pytest.raises(ValueError, match="H, W, 3"):
        viz.overlay(IMAGES[0, :, :, :2], MAPS[0])


def test_plot_examples_grid():
    fig = viz.plot_examples(IMAGES, MAPS, MASKS, SCORES, LABELS, n=3, title="demo")
    assert fig.get_suptitle() == "demo"
    image_axes = [ax for ax in fig.axes if ax.get_title()]  # colour bars have no title
    assert len(image_axes) == 9
    # Two anomalous (half of 3, rounded up) then one normal image, in dataset order.
    assert [ax.get_title() for ax in image_axes[::3]] == ["image 0", "image 1", "image 2"]
    assert image_axes[0].get_ylabel() == "anomalous\nscore 0.9"
    assert image_axes[6].get_ylabel() == "normal\nscore 0.5"
    # All overlays share one colour scale.
    assert {ax.images[1].get_clim() for ax in image_axes[2::3]} == {(float(MAPS[:3].min()), float(MAPS[:3].max()))}


def test_plot_examples_indices_and_shapes():
    fig = viz.plot_examples(IMAGES, MAPS, MASKS, SCORES, LABELS, indices=[4])
    assert [ax.get_title() for ax in fig.axes if ax.get_title()][0] == "image 4"
    with pytest.raises(ValueError, match="indices"):
        viz.plot_examples(IMAGES, MAPS, MASKS, SCORES, LABELS, indices=[5])
    with pytest.raises(ValueError, match="maps"):
        viz.plot_examples(IMAGES, MAPS[:, :8], MASKS, SCORES, LABELS)
    with pytest.raises(ValueError, match="equal length"):
        viz.plot_examples(IMAGES, MAPS, MASKS, SCORES[:4], LABELS)


def test_failure_cases_rank_the_worst_of_each_class_first():
    # Normal images 2, 3, 4 score 0.5, 0.1, 0.2; anomalous 0, 1 score 0.9, 0.4.
    normal, anomalous = viz.failure_cases(LABELS, SCORES, n=2)
    assert normal.tolist() == [2, 4] and anomalous.tolist() == [1, 0]
    normal, anomalous = viz.failure_cases(LABELS, SCORES, n=10)  # capped at each class's size
    assert normal.tolist() == [2, 4, 3] and anomalous.tolist() == [1, 0]
    normal, _ = viz.failure_cases([0, 0, 0, 1], [0.3, 0.7, 0.7, 0.1], n=2)
    assert normal.tolist() == [1, 2]  # a tie keeps dataset order
    with pytest.raises(ValueError, match="at least 1"):
        viz.failure_cases(LABELS, SCORES, n=0)


def test_plot_failures_columns_titles_and_marks():
    fig = viz.plot_failures(IMAGES, MAPS, MASKS, SCORES, LABELS, n=1, threshold=0.45,
                            defects=["hole", "crack", "good", "good", "good"], title="gallery")
    assert fig.get_suptitle() == "gallery"
    image_axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(image_axes) == 6  # two cases (one of each kind) x image, ground truth, map
    tops = [ax.get_title() for ax in image_axes[:2]]
    # Image 2 (normal, 0.5) outranks anomalous image 1 (0.4); image 1 falls below normal image 2.
    assert tops[0] == "false positive 1: image 2\ngood, score 0.5, flagged\nabove 1 of 2 anomalous"
    assert tops[1] == "false negative 1: image 1\ncrack, score 0.4, passed\nbelow 1 of 3 normal"
    for ax, i in zip(image_axes[:2], (2, 1)):  # a cross on the map's maximum
        y, x = np.unravel_index(MAPS[i].argmax(), MAPS[i].shape)
        assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines] == [(x, y), (x, y)]
    map_axes = image_axes[4:]
    assert {ax.images[1].get_clim() for ax in map_axes} == {(float(MAPS[[2, 1]].min()), float(MAPS[[2, 1]].max()))}
    assert not map_axes[0].collections and map_axes[1].collections  # only the defect is outlined
    assert [t.get_text() for t in map_axes[0].get_legend().get_texts()] == ["ground truth", "map maximum"]


def test_plot_failures_names_an_error_only_where_the_threshold_makes_one():
    def tops(**kwargs):
        fig = viz.plot_failures(IMAGES, MAPS, MASKS, SCORES, LABELS, n=1, **kwargs)
        return [ax.get_title().split(":")[0] for ax in fig.axes if ax.get_title()][:2]

    assert tops(threshold=0.45) == ["false positive 1", "false negative 1"]
    assert tops(threshold=0.3) == ["false positive 1", "caught, lowest-scored anomalous 1"]  # 0.4 is flagged
    assert tops(threshold=0.9) == ["passed, highest-scored normal 1", "false negative 1"]
    assert tops() == ["highest-scored normal 1", "lowest-scored anomalous 1"]  # no threshold: ranks only


def test_plot_failures_checks_inputs():
    with pytest.raises(ValueError, match="maps"):
        viz.plot_failures(IMAGES, MAPS[:, :8], MASKS, SCORES, LABELS)
    with pytest.raises(ValueError, match="one defect name per image"):
        viz.plot_failures(IMAGES, MAPS, MASKS, SCORES, LABELS, defects=["hole"])
    with pytest.raises(ValueError, match="at least 1"):
        viz.plot_failures(IMAGES, MAPS, MASKS, SCORES, LABELS, n=0)


def test_plot_roc_compares_models_on_one_axes():
    fig = viz.plot_roc(LABELS, SCORES, label="patchcore")
    ax = fig.axes[0]
    viz.plot_roc(LABELS, -SCORES, ax=ax, label="reversed")
    assert ax.get_title() and ax.get_xlabel().startswith("false positive rate") and ax.get_ylabel()
    # Anomalous 0.9 and 0.4 against normal 0.5, 0.1, 0.2: 5 of 6 pairs ranked right.
    assert legend_texts(ax) == ["chance", "patchcore (AUROC 0.833)", "reversed (AUROC 0.167)"]
    with pytest.raises(ValueError, match="both normal and anomalous"):
        viz.plot_roc([0, 0], [0.1, 0.2])


def test_plot_pro_curve_reports_aupro():
    fig = viz.plot_pro_curve(MASKS, MAPS, fpr_limit=0.3, label="m")
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel() and ax.get_xlim() == (0, 0.3)
    assert legend_texts(ax) == ["perfect", f"m (AUPRO@0.3 {aupro(MASKS, MAPS, 0.3):.3f})"]
    assert ax.lines[-1].get_xdata()[-1] == 0.3


def test_plot_score_histogram_with_threshold():
    fig = viz.plot_score_histogram(LABELS, SCORES, threshold=0.45, bins=5)
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() == "image anomaly score" and ax.get_ylabel() == "number of images"
    assert legend_texts(ax) == ["normal (3)", "anomalous (2)", "threshold 0.45"]
    assert sum(p.get_height() for p in ax.patches) == len(SCORES)


def test_plot_bar_groups_metrics_per_row():
    rows = [{"name": "bottle", "image_auroc": 1.0, "aupro": 0.9}, {"name": "grid", "image_auroc": 0.8, "aupro": 0.7}]
    fig = viz.plot_bar(rows, ["image_auroc", "aupro"], title="per category")
    ax = fig.axes[0]
    assert ax.get_title() == "per category" and ax.get_xlabel() == "name" and ax.get_ylabel()
    assert legend_texts(ax) == ["image_auroc", "aupro"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bottle", "grid"]
    assert [p.get_height() for p in ax.patches] == [1.0, 0.8, 0.9, 0.7]
    with pytest.raises(ValueError, match="missing"):
        viz.plot_bar(rows, ["pixel_auroc"])


def test_flow_diagram_draws_every_step_and_arrow():
    steps = [("a", "first"), ("b", "second"), ("c", "third")]

    def parts(figure):
        items = figure.axes[0].texts
        arrows = [t for t in items if isinstance(t, matplotlib.text.Annotation)]
        return [t.get_text() for t in items if t not in arrows], len(arrows)

    assert parts(viz.flow_diagram(steps)) == (["a\n\nfirst", "b\n\nsecond", "c\n\nthird"], 2)
    texts, arrows = parts(viz.flow_diagram(steps, loop=(2, 0, "again")))
    assert texts[-1] == "again" and arrows == 3  # one more arrow: the loop back
