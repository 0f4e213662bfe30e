"""`--cluster`: group a flat folder's faces into people by average linkage over a sparse neighbour graph.

Single linkage (connected components of "closer than the same-person threshold") chains different people
together through their closest look-alikes: on real photos one component swallows whole crowds. Average
linkage merges two groups only while the mean similarity over *all* their cross pairs stays above the
threshold, which a chain of look-alikes does not reach.

For unit vectors the mean cross-pair dot product of groups A and B is `sum(A) . sum(B) / (|A| |B|)`, so the
linkage of any two groups is exact from their sums, whatever the graph holds. The graph only decides which
groups may meet: two groups are candidates when some pair of their faces is above the threshold (from
`similar_pairs_indexed`, an inverted-file index when the folder is large). Merging follows reciprocal
agglomerative clustering: every round merges all pairs of groups that are each other's best candidate. For a
reducible linkage such as average linkage this gives the same groups as merging the single best pair at a
time, and each round is a few vectorised passes over the edges, so time and memory grow about linearly with
the number of faces (plus the edges above the threshold).
"""

from __future__ import annotations

import numpy as np

from dynamicid.curation.neighbors import similar_pairs_indexed

EDGE_CHUNK = 1 << 18  # edges whose group sums are gathered at once (bounds the temporary memory)
NEIGHBOURS = 16  # a face keeps its edges to its 16 most similar faces: enough to connect a person, and it
# bounds the graph at 16 edges a face however many photos one person has


METHOD = (
    "average linkage: groups whose faces are on average closer than the backend's same-person distance "
    f"(reciprocal merging over each face's {NEIGHBOURS} nearest above-threshold neighbours)"
)
SMALL_GROUP = 2  # groups of at most this many photos are listed in summary.json: likely strangers or outliers


def grouping_summary(sizes: dict[str, int], threshold: float) -> dict:
    """How `--cluster` formed the identities (threshold: the backend's same-person distance), for summary.json
    and the dataset card."""
    return {
        "method": METHOD,
        "threshold": round(threshold, 4),
        "groups": len(sizes),
        "small_groups": {name: n for name, n in sorted(sizes.items()) if n <= SMALL_GROUP},
    }


def _linkage(sums: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean cross-pair similarity of groups a[k] and b[k], in chunks of edges."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), EDGE_CHUNK):
        sa, sb = a[start : start + EDGE_CHUNK], b[start : start + EDGE_CHUNK]
        dots = np.einsum("ij,ij->i", sums[sa], sums[sb])
        out[start : start + EDGE_CHUNK] = dots / (counts[sa] * counts[sb])
    return out


def _best_candidates(a: np.ndarray, b: np.ndarray, sims: np.ndarray, n: int) -> np.ndarray:
    """For each group, the candidate with the highest linkage (ties: the smaller id); -1 for none."""
    src, dst, s = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([sims, sims])
    top = np.full(n, -np.inf, np.float32)
    np.maximum.at(top, src, s)
    at_top = s == top[src]
    best = np.full(n, n, np.int64)
    np.minimum.at(best, src[at_top], dst[at_top])
    best[best == n] = -1
    return best


def strongest_edges(pairs: np.ndarray, sims: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs that are among the k most similar of either of their faces."""
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    # One integer sort: face, then similarity descending (quantised to 16 bits: ties only reorder equals).
    quantised = np.round((1.0 - np.clip(np.concatenate([sims, sims]), -1.0, 1.0)) * 32767.0).astype(np.int64)
    order = np.argsort(src.astype(np.int64) << 16 | quantised, kind="stable")
    starts = np.searchsorted(src[order], np.arange(n))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - starts[src[order]]
    keep = (rank[: len(pairs)] < k) | (rank[len(pairs) :] < k)
    return pairs[keep], sims[keep]


def average_linkage(embeddings: np.ndarray, min_cos: float) -> np.ndarray:
    """Group label per face (numbered by each group's smallest face index): average-linkage groups whose mean
    cross-pair cosine similarity is >= min_cos, merging only groups linked by an above-threshold pair."""
    x = np.asarray(embeddings, np.float32)
    n = len(x)
    pairs, sims = similar_pairs_indexed(x, min_cos)  # between single faces the linkage is the pair's similarity
    pairs, sims = strongest_edges(pairs, sims, n, NEIGHBOURS)
    owner = np.arange(n, dtype=np.int64)  # face -> group id (the group's smallest face index)
    sums = x.copy()
    counts = np.ones(n, np.float32)
    a, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    while True:
        # A dropped pair of groups can rise above the threshold again only by merging with a group that is above
        # it on its own, and so still has its own edge to the other side.
        keep = sims >= min_cos
        a, b, sims = a[keep], b[keep], sims[keep]
        if not len(a):
            break
        best = _best_candidates(a, b, sims, n)
        groups = np.nonzero(best >= 0)[0]
        partner = best[groups]
        lower = groups[(best[partner] == groups) & (groups < partner)]  # reciprocal pairs, each once
        upper = best[lower]
        sums[lower] += sums[upper]
        counts[lower] += counts[upper]
        remap = np.arange(n, dtype=np.int64)
        remap[upper] = lower
        owner = remap[owner]
        merged = np.zeros(n, bool)
        merged[lower] = True
        a, b = remap[a], remap[b]
        changed = merged[a] | merged[b]
        # Only edges that touch a merged group change their linkage or can now repeat (or loop back on themselves).
        ca, cb = np.minimum(a[changed], b[changed]), np.maximum(a[changed], b[changed])
        key = np.unique(ca[ca != cb] * n + cb[ca != cb])
        ca, cb = key // n, key % n
        a, b = np.concatenate([a[~changed], ca]), np.concatenate([b[~changed], cb])
        sims = np.concatenate([sims[~changed], _linkage(sums, counts, ca, cb)])
    _, labels = np.unique(owner, return_inverse=True)  # group ids are smallest face indices: order kept
    return labels.astype(np.int64)
