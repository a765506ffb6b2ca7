"""Predict a config's validation loss at the horizon from its learning curve, with a spread.

A multi-fidelity study measures each surviving config's validation loss at a few points (samples
trained). Where the longest trials stop short of the horizon, configs are ranked by the loss
predicted at the horizon. The model is the three-parameter power law

    L(n) = L_inf + b * n^-c    ("pow3", Domhan, Springenberg & Hutter, IJCAI 2015; the form of
                                Kaplan et al. 2020's L(D))

fitted by scipy's ``curve_fit`` with bounds that keep it physical: b >= 0 (the loss falls),
c in [0.05, 2], 0 <= L_inf <= the smallest loss measured. The spread is one standard deviation:
the parameter covariance carried to the prediction by the delta method, plus the residual
scatter. It grows with the distance extrapolated (the c-direction of the gradient grows as
log n) and with a noisy curve. A fit through three to five points hardly measures its own noise:
the scatter has a floor of ``_NOISE_FLOOR`` of the loss (no prediction is sharper than the
evaluations it rests on), and the spread is widened to the half-width of Student's t central
68 % interval with the fit's n - 3 degrees of freedom (at least 1), so that it covers the truth
about as often as one standard deviation would with the noise known.

``predict_loss`` returns None when the curve cannot be fitted honestly (too few points, values
that are not finite and >= 0, a failed fit, or a curve rising at its end, which a falling power
law would hide); the caller then ranks by what was measured and says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

POW3 = "pow3: L(n) = L_inf + b * n^-c"
_EXPONENT_BOUNDS = (0.05, 2.0)
#: the least scatter assumed of a validation loss, as a share of it
_NOISE_FLOOR = 0.005
#: a rise of the last loss over the one before beyond this share of it (and beyond the scatter) is real
_RISE_TOLERANCE = 0.01


@dataclass(frozen=True)
class CurvePrediction:
    """The validation loss predicted at ``target_samples`` and its spread, about one standard deviation."""

    loss: float
    spread: float
    target_samples: float
    fitted_points: int
    model: str = POW3

    def to_dict(self) -> dict:
        return asdict(self)


def predict_loss(samples: Sequence[float], losses: Sequence[float], target_samples: float) -> CurvePrediction | None:
    """The pow3 fit of ``losses`` measured after ``samples`` samples, evaluated at ``target_samples``.

    At a target within the measured range this is the fitted value there (interpolation), which
    smooths the scatter of single evaluations the same way the extrapolation does.
    """
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit
    from scipy.stats import norm, t

    if not math.isfinite(target_samples) or target_samples <= 0:
        raise ValueError(f"target_samples must be a finite number > 0, not {target_samples!r}")
    n = np.asarray(samples, dtype=float)
    loss = np.asarray(losses, dtype=float)
    if n.ndim != 1 or n.shape != loss.shape or not (np.isfinite(n).all() and np.isfinite(loss).all()):
        return None
    if (n <= 0).any() or (loss < 0).any() or np.unique(n).size < 3:
        return None
    order = np.argsort(n, kind="stable")
    n, loss = n[order], loss[order]
    if _rising_at_end(n, loss):
        return None
    # Rescaled so that the last measurement sits at x = 1: b is then the loss above L_inf there, of the
    # order of the losses, where raw counts of 1e3 to 1e7 samples raised to -c make an ill-conditioned fit.
    scale = n[-1]
    x = n / scale

    def pow3(x, l_inf, b, c):
        return l_inf + b * x ** (-c)

    upper_l_inf = max(float(loss.min()), 1e-12)
    bounds = ([0.0, 0.0, _EXPONENT_BOUNDS[0]], [upper_l_inf, np.inf, _EXPONENT_BOUNDS[1]])
    best = None
    for c0 in (0.25, 0.5, 1.0):
        l_inf0 = 0.5 * upper_l_inf
        b0 = max(float(loss[0]) - l_inf0, 1e-12) * float(x[0]) ** c0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            try:
                popt, pcov = curve_fit(pow3, x, loss, p0=[l_inf0, b0, c0], bounds=bounds, absolute_sigma=True)
            except (RuntimeError, ValueError):
                continue
        squared = float(np.sum((loss - pow3(x, *popt)) ** 2))
        if np.isfinite(popt).all() and np.isfinite(pcov).all() and (best is None or squared < best[2]):
            best = (popt, pcov, squared)
    if best is None:
        return None
    popt, unscaled_cov, squared = best
    dof = loss.size - popt.size
    variance = max(squared / dof if dof > 0 else 0.0, (_NOISE_FLOOR * float(loss.mean())) ** 2)
    l_inf, b, c = popt
    x_target = target_samples / scale
    gradient = np.array([1.0, x_target ** (-c), -b * x_target ** (-c) * math.log(x_target)])
    parameter_variance = float(gradient @ (unscaled_cov * variance) @ gradient)
    one_sigma_t = float(t.ppf(norm.cdf(1.0), max(dof, 1)))
    spread = one_sigma_t * math.sqrt(max(parameter_variance, 0.0) + variance)
    predicted = float(pow3(x_target, l_inf, b, c))
    if not (math.isfinite(predicted) and math.isfinite(spread)):
        return None
    return CurvePrediction(predicted, spread, float(target_samples), int(loss.size))


def _rising_at_end(n, loss) -> bool:
    """Whether the mean loss at the last n is above the lowest mean before it by more than ``_RISE_TOLERANCE``.

    Compared with the lowest earlier loss, not with a fit: a curve that falls and then rises
    (over-fitting, a learning rate too high to settle) fits a power law badly, and that misfit
    would pass for noise. A flat, noisy curve may be refused too; it is then ranked by its
    last measured loss, which on a flat curve is about what the fit would have predicted.
    """
    import numpy as np

    _, index = np.unique(n, return_inverse=True)
    means = np.bincount(index, weights=loss) / np.bincount(index)
    lowest_before = float(means[:-1].min())
    return bool(means[-1] - lowest_before > _RISE_TOLERANCE * abs(lowest_before))
