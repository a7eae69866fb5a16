"""course_utils/diagrams.py: the LoRA boxes are to scale, the pipelines list their stages in order."""

import pytest
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from course_utils.diagrams import lora_parameter_counts, plot_lora, plot_rlhf_vs_dpo
from course_utils.plots import save_figure


def _by_gid(fig, kind):
    return {p.get_gid(): p for p in fig.axes[0].patches if isinstance(p, kind) and p.get_gid()}


def _texts(fig):
    return [t.get_text() for t in fig.axes[0].texts] + [fig.axes[0].get_title()]


@pytest.mark.parametrize("d,k,r", [(576, 576, 16), (64, 64, 8), (4096, 14336, 16), (10, 30, 2)])
def test_lora_boxes_are_to_scale(d, k, r):
    fig = plot_lora(d, k, r)
    boxes = _by_gid(fig, Rectangle)
    counts = lora_parameter_counts(d, k, r)
    for name in ("W", "B", "A"):  # one unit = one row or column, so area = parameters
        assert boxes[name].get_width() * boxes[name].get_height() == pytest.approx(counts[name])
    assert (boxes["W"].get_height(), boxes["W"].get_width()) == (d, k)  # d rows, k columns
    assert (boxes["B"].get_height(), boxes["B"].get_width()) == (d, r)
    assert (boxes["A"].get_height(), boxes["A"].get_width()) == (r, k)
    assert fig.axes[0].get_aspect() == 1.0  # equal aspect, or the areas on screen would lie
    # B sits right of W, A on top of B·A: the three boxes do not overlap
    assert boxes["B"].get_x() > boxes["W"].get_x() + k and boxes["A"].get_x() >= boxes["B"].get_x() + r


def test_lora_labels_give_shapes_and_counts():
    text = "\n".join(_texts(plot_lora(576, 576, 16, alpha=32)))
    for piece in ("576 × 576", "576 × 16", "16 × 576", "331,776", "9,216", "18,432", "(32/16)", "5.6%"):
        assert piece in text, piece
    assert "(α/r)" in "\n".join(_texts(plot_lora(8, 8, 2)))  # no alpha given: the symbol, not a number


def test_lora_counts_reject_a_zero_rank():
    assert lora_parameter_counts(4, 6, 2) == {"W": 24, "B": 8, "A": 12}
    with pytest.raises(ValueError):
        lora_parameter_counts(4, 6, 0)


def test_pipelines_have_their_stages_in_order():
    fig = plot_rlhf_vs_dpo()
    boxes = _by_gid(fig, FancyBboxPatch)
    rows = {row: sorted((p for g, p in boxes.items() if g.startswith(row + ":")), key=lambda p: p.get_x())
            for row in ("rlhf", "dpo")}
    words = {row: [p.get_label().lower() for p in rows[row]] for row in rows}
    expected = {"rlhf": ["sft", "sample", "preferences", "reward model", "ppo", "policy"],
                "dpo": ["sft", "preference", "dpo loss", "policy"]}
    for row, keys in expected.items():
        assert len(words[row]) == len(keys) and all(key in label for key, label in zip(keys, words[row])), words[row]
    assert "kl to" in words["rlhf"][4] and "bradley-terry" in words["rlhf"][3]
    assert not any("reward model" in w for w in words["dpo"])  # the point of the figure
    assert rows["rlhf"][0].get_y() > rows["dpo"][0].get_y()  # RLHF on top
    # DPO's loss sits under the RL stage it replaces, so the reward model's column is empty in its row
    assert rows["dpo"][2].get_x() == pytest.approx(rows["rlhf"][4].get_x())
    arrows = [p.get_gid() for p in fig.axes[0].patches if isinstance(p, FancyArrowPatch)]
    assert sorted(arrows) == sorted([f"rlhf-arrow:{i}" for i in range(5)] + [f"dpo-arrow:{i}" for i in range(3)])
    assert {t for t in _texts(fig)} >= {"RLHF", "DPO"}


def test_diagrams_save_as_identical_pngs(tmp_path):
    a = save_figure(plot_rlhf_vs_dpo(), tmp_path / "a.png").read_bytes()
    b = save_figure(plot_rlhf_vs_dpo(), tmp_path / "b.png").read_bytes()
    assert a == b and a[:8] == b"\x89PNG\r\n\x1a\n"
