import math

import pytest

from dpllm.privacy.audit import epsilon_lower_bound, tail


def test_all_correct_guesses_give_the_closed_form_bound():
    # r right out of r: the tail is p^r, so the bound solves p^r = beta, eps = log(p / (1 - p)).
    p = 0.05 ** (1 / 200)
    assert epsilon_lower_bound(200, 200) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_chance_level_guessing_gives_zero_and_the_tail_is_binomial():
    assert epsilon_lower_bound(100, 200) == 0.0
    assert epsilon_lower_bound(0, 0) == 0.0
    # hand-worked: 2 right of 2 at eps = 0 is (1/2)^2; 1 or more right of 2 is 3/4.
    assert tail(2, 2, 0.0) == pytest.approx(0.25) and tail(1, 2, 0.0) == pytest.approx(0.75)
    bound = epsilon_lower_bound(150, 200)
    assert tail(150, 200, bound) == pytest.approx(0.05, abs=1e-4)
    with pytest.raises(ValueError):
        epsilon_lower_bound(3, 2)
