import math

import pytest

from steerkit.stats import spearman, wilson


def test_wilson_known_values():
    # reference values computed independently from the closed form (z = 1.96)
    p, lo, hi = wilson(5, 10)
    assert p == 0.5 and lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    p, lo, hi = wilson(0, 10)
    assert p == 0 and lo == 0 and hi == pytest.approx(0.2775, abs=1e-3)
    p, lo, hi = wilson(10, 10)
    assert p == 1 and hi == pytest.approx(1) and lo == pytest.approx(0.7225, abs=1e-3)
    assert math.isnan(wilson(0, 0)[0])


def test_wilson_narrows_with_n():
    assert wilson(50, 100)[2] - wilson(50, 100)[1] < wilson(5, 10)[2] - wilson(5, 10)[1]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.866, abs=1e-3)  # ties
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


def test_kappa_lives_in_stats_and_judge_fit_reexports_it():
    from steerkit import judge_fit
    from steerkit.errors import SteerkitError
    from steerkit.stats import kappa

    assert judge_fit.kappa is kappa
    assert kappa([True, False, True, False], [True, False, True, False]) == 1.0
    assert kappa([True, True], [True, True]) == 1.0  # both constant and equal
    # po = 0.5, pa = pb = 0.5 -> pe = 0.5 -> kappa 0
    assert kappa([True, True, False, False], [True, False, True, False]) == pytest.approx(0.0)
    assert kappa([True, False], [False, True]) == pytest.approx(-1.0)
    with pytest.raises(SteerkitError, match="equal, non-zero length"):
        kappa([], [])
    with pytest.raises(SteerkitError, match="equal, non-zero length"):
        kappa([True], [True, False])
