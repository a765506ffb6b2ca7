import math

import numpy as np
import pytest

from autobatch.search.curves import POW3, CurvePrediction, predict_loss

L_INF, B, C = 0.3, 4.0, 0.4
SAMPLES = np.array([1, 3, 9, 27, 81]) * 1000.0


def power_law(n):
    return L_INF + B * np.asarray(n, dtype=float) ** -C


@pytest.mark.parametrize("factor", [3, 10])
def test_an_exact_power_law_is_extrapolated_closely_with_a_small_spread(factor):
    target = factor * SAMPLES[-1]
    prediction = predict_loss(SAMPLES, power_law(SAMPLES), target)
    assert isinstance(prediction, CurvePrediction)
    assert prediction.loss == pytest.approx(power_law(target), rel=1e-4)
    assert 0 < prediction.spread < 0.03 * prediction.loss
    assert (prediction.target_samples, prediction.fitted_points, prediction.model) == (target, 5, POW3)
    assert prediction.to_dict() == {
        "loss": prediction.loss,
        "spread": prediction.spread,
        "target_samples": target,
        "fitted_points": 5,
        "model": POW3,
    }


def test_the_order_of_the_points_does_not_matter():
    shuffled = [3, 0, 4, 1, 2]
    target = 10 * SAMPLES[-1]
    in_order = predict_loss(SAMPLES, power_law(SAMPLES), target)
    assert in_order == predict_loss(SAMPLES[shuffled], power_law(SAMPLES)[shuffled], target)


def test_noise_widens_the_spread_and_it_still_covers_the_truth():
    target = 10 * SAMPLES[-1]
    exact = predict_loss(SAMPLES, power_law(SAMPLES), target)
    rng = np.random.default_rng(7)
    misses = []
    for _ in range(20):
        noisy = power_law(SAMPLES) * (1 + 0.03 * rng.standard_normal(SAMPLES.size))
        prediction = predict_loss(SAMPLES, noisy, target)
        if prediction is None:  # a chance rise at the end, refused as it should be
            continue
        assert prediction.spread > exact.spread
        misses.append(abs(prediction.loss - power_law(target)) / prediction.spread)
    assert len(misses) >= 15
    assert max(misses) < 3
    # One spread is about one standard deviation: neither far too wide nor far too narrow.
    assert 0.3 < float(np.sqrt(np.mean(np.square(misses)))) < 2


def test_the_spread_grows_with_the_distance_extrapolated():
    noisy = power_law(SAMPLES) * (1 + 0.02 * np.array([1, -1, 0.5, -0.5, 0.2]))
    spreads = [predict_loss(SAMPLES, noisy, factor * SAMPLES[-1]).spread for factor in (2, 10, 100, 1000)]
    assert spreads == sorted(spreads) and spreads[-1] > 1.5 * spreads[0]


def test_a_target_within_the_measured_range_gives_the_fitted_value_there():
    prediction = predict_loss(SAMPLES, power_law(SAMPLES), 20_000)
    assert prediction.loss == pytest.approx(power_law(20_000), rel=1e-4)
    assert prediction.spread < predict_loss(SAMPLES, power_law(SAMPLES), 10 * SAMPLES[-1]).spread


def test_three_points_suffice_and_the_spread_admits_how_little_they_say():
    three = predict_loss(SAMPLES[2:], power_law(SAMPLES[2:]), 10 * SAMPLES[-1])
    five = predict_loss(SAMPLES, power_law(SAMPLES), 10 * SAMPLES[-1])
    assert three.fitted_points == 3
    assert abs(three.loss - power_law(10 * SAMPLES[-1])) < 2 * three.spread
    assert three.spread > five.spread


@pytest.mark.parametrize(
    "samples, losses, why",
    [
        ([1000, 3000, 9000, 27000], [1.0, 0.7, 0.5, 0.6], "over-fitting: the last loss rises"),
        ([1000, 3000, 9000, 27000, 81000], [1.0, 0.7, 0.5, 0.45, 0.6], "diverging at the end"),
        ([1000, 3000], [1.0, 0.7], "two points"),
        ([1000, 3000, 3000, 3000], [1.0, 0.7, 0.71, 0.69], "two distinct n"),
        ([1000, 3000, 9000, 27000], [1.0, 0.7, math.nan, 0.4], "NaN loss"),
        ([1000, 3000, 9000, 27000], [1.0, 0.7, 0.5, math.inf], "infinite loss"),
        ([1000, 3000, 9000, 27000], [1.0, 0.7, -0.5, 0.4], "negative loss"),
        ([0, 3000, 9000, 27000], [1.0, 0.7, 0.5, 0.4], "n = 0"),
        ([1000, 3000, 9000], [1.0, 0.7, 0.5, 0.4], "lengths differ"),
    ],
)
def test_curves_that_cannot_be_fitted_honestly_give_none(samples, losses, why):
    assert predict_loss(samples, losses, 100_000) is None, why


def test_a_flat_noisy_tail_is_not_mistaken_for_a_rise():
    losses = [1.0, 0.7, 0.5, 0.45, 0.452]
    prediction = predict_loss(SAMPLES, losses, 10 * SAMPLES[-1])
    assert prediction is not None and prediction.loss <= 0.452


@pytest.mark.parametrize("target", [0, -1, math.nan, math.inf])
def test_a_target_that_is_not_a_positive_number_is_a_caller_error(target):
    with pytest.raises(ValueError, match="target_samples"):
        predict_loss(SAMPLES, power_law(SAMPLES), target)
