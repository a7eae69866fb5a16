"""The π*-against-β figure of lesson 2 (``course_utils.plots.plot_optimal_policy_vs_beta``) draws Eq. 4 right.

The curves must be distributions at every β, tend to the reference as β grows and to the best response as β
shrinks, and move monotonically in between for the best and the worst response; the figure marks both limits.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from course_utils import toy
from course_utils.plots import optimal_policy_curves, plot_optimal_policy_vs_beta, save_figure


@pytest.fixture
def problem():
    ref, rewards = toy.random_problem(6, seed=0)  # lesson 2's toy problem
    return ref.numpy(), rewards.numpy()


def test_curves_are_distributions_between_the_two_limits(problem):
    ref, rewards = problem
    betas = np.logspace(-3, 4, 50)
    curves = optimal_policy_curves(ref, rewards, betas)
    assert curves.shape == (50, 6)
    np.testing.assert_allclose(curves.sum(axis=1), 1.0, atol=1e-12)  # every row is a distribution
    assert (curves >= 0).all()
    np.testing.assert_allclose(curves[-1], ref, atol=1e-3)  # β = 1e4: back at π_ref
    best = np.argmax(rewards)
    np.testing.assert_allclose(curves[0], np.eye(6)[best], atol=1e-9)  # β = 1e-3: all mass on the argmax
    # π*(best) only falls as β grows, π*(worst) only rises (each is a ratio of monotone sums in 1/β)
    assert (np.diff(curves[:, best]) <= 1e-15).all()
    assert (np.diff(curves[:, np.argmin(rewards)]) >= -1e-15).all()
    # KL(π* || π_ref) shrinks as β grows (its derivative in 1/β is Var_π*(r)/β ≥ 0)
    kls = np.asarray(toy.kl(curves, np.tile(ref, (len(betas), 1))))
    assert (np.diff(kls) <= 1e-12).all() and kls[0] > 1.0 > 1e-6 > kls[-1]


def test_curves_match_eq_4(problem):
    ref, rewards = problem
    for beta in (0.1, 0.5, 2.0):
        expected = ref * np.exp(rewards / beta) / (ref * np.exp(rewards / beta)).sum()
        np.testing.assert_allclose(optimal_policy_curves(ref, rewards, [beta])[0], expected, rtol=1e-12)
    # a response π_ref never produces stays at 0 for every β, even if it has the best reward
    masked = np.array([0.5, 0.5, 0.0])
    curves = optimal_policy_curves(masked, np.array([0.0, 1.0, 5.0]), [1e-3, 1.0, 1e3])
    assert (curves[:, 2] == 0).all() and curves[0, 1] == pytest.approx(1.0)


def test_figure_draws_each_response_and_both_limits(problem, tmp_path):
    ref, rewards = problem
    betas = np.logspace(-2, 2, 41)
    fig = plot_optimal_policy_vs_beta(ref, rewards, betas=betas, mark_beta=0.5)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == len(betas)]
    assert len(curves) == 6 and len(ax.get_legend().get_texts()) == 6
    np.testing.assert_allclose(np.vstack([line.get_ydata() for line in curves]).T,
                               optimal_policy_curves(ref, rewards, betas))
    markers = [line for line in ax.get_lines() if len(line.get_xdata()) == 1]
    right = sorted(float(m.get_ydata()[0]) for m in markers if m.get_xdata()[0] > betas.max())
    left = sorted(float(m.get_ydata()[0]) for m in markers if m.get_xdata()[0] < betas.min())
    np.testing.assert_allclose(right, np.sort(ref))  # β → ∞: π_ref
    assert left == [0.0] * 5 + [1.0]  # β → 0: the argmax
    assert any(np.allclose(line.get_xdata(), 0.5) for line in ax.get_lines())  # the lesson's β
    first = save_figure(fig, tmp_path / "a.png").read_bytes()
    again = plot_optimal_policy_vs_beta(ref, rewards, betas=betas, mark_beta=0.5)
    assert save_figure(again, tmp_path / "b.png").read_bytes() == first  # reproducible files
    host = Figure()
    assert plot_optimal_policy_vs_beta(ref, rewards, ax=host.add_subplot()) is host  # the caller's axes
