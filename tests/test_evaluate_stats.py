"""The summary's bootstrap intervals against normal theory (scipy), not against the resampling code.

With many images the bootstrap distribution of a mean is close to normal, so a 95 % percentile interval is
mean +- z(0.975) * sd / sqrt(n); a paired delta's spread is that of the per-image differences, not of either side.
"""

import numpy as np
import pytest
from scipy.stats import norm

from dynamicid.evaluate.stats import delta_interval, mean_interval

IMAGES = 400


def per_image(values: np.ndarray) -> dict[str, tuple[float, int]]:
    """One value per image, as `image_sums` gives them: image id -> (sum, count)."""
    return {f"img{i:04d}": (float(v), 1) for i, v in enumerate(values)}


def test_mean_interval_is_a_95_percent_interval():
    values = np.random.default_rng(1).normal(3.0, 2.0, IMAGES)
    figure = mean_interval(per_image(values))
    assert figure["n"] == IMAGES
    assert figure["mean"] == pytest.approx(values.mean(), abs=1e-12)
    half_width = norm.ppf(0.975) * values.std() / np.sqrt(IMAGES)
    # The bootstrap's own noise (2000 draws) is a few per cent; a 90 % interval would be 0.84 of this width.
    assert (figure["high"] - figure["low"]) / (2 * half_width) == pytest.approx(1.0, abs=0.06)
    assert (figure["high"] + figure["low"]) / 2 == pytest.approx(values.mean(), abs=0.1 * half_width)


def test_paired_delta_resamples_the_same_images_on_both_sides():
    """b = a + 0.3 + small noise per image: the paired interval is as narrow as the differences' spread, about 14x
    narrower than two independent resamplings of the two sides would give."""
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, IMAGES)
    differences = 0.3 + rng.normal(0.0, 0.1, IMAGES)
    b = a + differences
    figure = delta_interval(per_image(a), per_image(b))
    assert figure["paired_images"] == IMAGES
    assert figure["delta"] == pytest.approx(differences.mean(), abs=1e-12)
    half_width = norm.ppf(0.975) * differences.std() / np.sqrt(IMAGES)
    assert (figure["high"] - figure["low"]) / (2 * half_width) == pytest.approx(1.0, abs=0.06)
    assert figure["low"] < differences.mean() < figure["high"]


def test_unpaired_delta_adds_both_sides_spreads():
    """No image in common: two independent resamplings, sd of the delta = sqrt(sd_a^2 / n_a + sd_b^2 / n_b)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.0, 1.0, IMAGES), rng.normal(0.5, 2.0, IMAGES // 2)
    figure = delta_interval(per_image(a), {f"other{i}": (float(v), 1) for i, v in enumerate(b)})
    assert figure["paired_images"] == 0
    assert figure["delta"] == pytest.approx(b.mean() - a.mean(), abs=1e-12)
    half_width = norm.ppf(0.975) * np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert (figure["high"] - figure["low"]) / (2 * half_width) == pytest.approx(1.0, abs=0.06)
