"""Choosing a backend's same-person threshold on some people and measuring it on others.

`cross_validate` splits the people (never their photos) into two halves of about equal photo counts, chooses the
threshold on one half's pairs and reports the balanced verification accuracy (mean of the same-person and the
different-person accuracy) on the other half's pairs, then the reverse. The threshold is where normal densities
fitted to the two halves' distances cross (equal priors): on a few hundred photos it moves less from split to
split than the argmax of the accuracy, which jumps between the few pairs at the edge (see BENCHMARKS.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fold:
    threshold: float  # chosen on the `chosen_on` people's pairs
    chosen_on: tuple[str, ...]
    train_accuracy: float  # balanced accuracy on the pairs it was chosen on
    held_out_accuracy: float  # balanced accuracy on the other people's pairs


def balanced_accuracy(same: np.ndarray, different: np.ndarray, threshold: float) -> float:
    """Mean of the share of same-person pairs below the threshold and of different-person pairs at or above it."""
    return float((np.mean(np.asarray(same) < threshold) + np.mean(np.asarray(different) >= threshold)) / 2)


def choose_threshold(same: np.ndarray, different: np.ndarray) -> float:
    """Where normal densities fitted to the same-person and the different-person distances cross (equal priors)."""
    m1, s1 = float(np.mean(same)), float(np.std(same))
    m2, s2 = float(np.mean(different)), float(np.std(different))
    # log N(t; m1, s1) = log N(t; m2, s2)  <=>  a t^2 + b t + c = 0; the root between the two means.
    a = 1 / (2 * s1**2) - 1 / (2 * s2**2)
    b = m2 / s2**2 - m1 / s1**2
    c = m1**2 / (2 * s1**2) - m2**2 / (2 * s2**2) - np.log(s2 / s1)
    roots = np.roots([a, b, c]) if abs(a) > 1e-12 else np.array([-c / b])
    between = [float(r.real) for r in np.atleast_1d(roots) if abs(r.imag) < 1e-12 and m1 <= r.real <= m2]
    return between[0] if between else (m1 + m2) / 2


def split_people(photos: dict[str, int], seed: int | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Two halves of the people with about equal photo counts, each person in turn to the half with fewer photos:
    largest first, or in a seeded random order (other splits, to see how much the threshold moves)."""
    order = sorted(photos, key=lambda p: (-photos[p], p))
    if seed is not None:
        order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    halves: tuple[list[str], list[str]] = ([], [])
    counts = [0, 0]
    for person in order:
        k = int(counts[1] < counts[0])
        halves[k].append(person)
        counts[k] += photos[person]
    return tuple(sorted(halves[0])), tuple(sorted(halves[1]))


def pair_distances(
    embeddings: list[tuple[str, np.ndarray]], distance: Callable[[np.ndarray, np.ndarray], float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances of every same-person pair and every different-person pair of (person, embedding) items."""
    same, different = [], []
    for (a, x), (b, y) in itertools.combinations(embeddings, 2):
        (same if a == b else different).append(distance(x, y))
    return np.array(same), np.array(different)


def cross_validate(
    embeddings: list[tuple[str, np.ndarray]],
    distance: Callable[[np.ndarray, np.ndarray], float],
    seed: int | None = None,
) -> list[Fold]:
    """Two folds: the threshold chosen on each half of the people (`split_people`), measured on the other half."""
    halves = split_people({p: sum(q == p for q, _ in embeddings) for p, _ in embeddings}, seed)
    pairs = [pair_distances([item for item in embeddings if item[0] in half], distance) for half in halves]
    folds = []
    for k in (0, 1):
        threshold = choose_threshold(*pairs[k])
        folds.append(
            Fold(
                threshold,
                halves[k],
                balanced_accuracy(*pairs[k], threshold),
                balanced_accuracy(*pairs[1 - k], threshold),
            )
        )
    return folds
