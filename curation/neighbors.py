"""Near-neighbour pairs and connected components without comparing everything with everything.

Embeddings are L2-normalised, so every distance the face backends use (Euclidean for dlib, cosine for
ArcFace) is a monotone function of the dot product; all thresholds here are cosine similarities (see
`cosine_threshold`). Small sets are compared exactly in blocks (memory O(n x block)); large sets go through
an inverted-file index: k-means cells, each vector filed under its nearest cell and compared with the vectors
of its `nprobe` nearest cells. Cost ~ n x (cells + nprobe x n / cells) instead of n^2.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dynamicid.curation.imagehash import hamming

EXACT_LIMIT = 4096  # above this many vectors, `similar_components` uses the inverted-file index
BLOCK = 1024
SMALL_GRAPH = 2048  # small, sparse graphs (one identity's photos) use a plain union-find, not a sparse matrix


def cosine_threshold(distance: Callable[[np.ndarray, np.ndarray], float], threshold: float, dim: int) -> float:
    """The cosine similarity at which `distance` between unit vectors equals `threshold` (bisection)."""
    a = np.zeros(dim, np.float32)
    a[0] = 1.0

    def dist_at(cos: float) -> float:
        b = np.zeros(dim, np.float32)
        b[0], b[1] = cos, np.sqrt(max(0.0, 1.0 - cos * cos))
        return float(distance(a, b))

    lo, hi = -1.0, 1.0  # distance decreases as cos grows
    for _ in range(40):
        mid = (lo + hi) / 2
        if dist_at(mid) > threshold:
            lo = mid
        else:
            hi = mid
    return hi


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label per node (labels numbered by the smallest node index in each component)."""
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    if n <= SMALL_GRAPH and len(edges) <= 4 * n:
        parent = list(range(n))  # union-find: for one identity's photos this beats building a sparse matrix

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for a, b in edges.tolist():
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        roots = [find(i) for i in range(n)]
        rank = {root: k for k, root in enumerate(sorted(set(roots)))}
        return np.array([rank[r] for r in roots], np.int64)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, np.int64)
    np.minimum.at(first, labels, np.arange(n))
    order = np.argsort(first, kind="stable")
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    return rank_of[labels]


def similar_pairs(embeddings: np.ndarray, min_cos: float) -> np.ndarray:
    """All pairs (i < j) with dot product >= min_cos, exact, in row blocks."""
    x = np.asarray(embeddings, np.float32)
    found = []
    for start in range(0, len(x), BLOCK):
        sims = x[start : start + BLOCK] @ x[start:].T
        i, j = np.nonzero(sims >= min_cos)
        i = i + start
        j = j + start
        keep = i < j
        found.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def hash_pairs(hashes: np.ndarray, mirror_hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Pairs (i < j) whose hashes differ in <= max_distance bits, directly or with one of them mirrored."""
    h = np.asarray(hashes, np.int64)
    m = np.asarray(mirror_hashes, np.int64)
    found = []
    for start in range(0, len(h), BLOCK):
        block = h[start : start + BLOCK, None]
        close = (hamming(block, h[None, start:]) <= max_distance) | (hamming(block, m[None, start:]) <= max_distance)
        i, j = np.nonzero(close)
        i = i + start
        j = j + start
        keep = i < j
        found.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def kmeans(x: np.ndarray, cells: int, *, iterations: int = 8, sample: int = 65536, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids trained on a seeded sample (deterministic)."""
    rng = np.random.default_rng(seed)
    train = x[rng.choice(len(x), size=min(sample, len(x)), replace=False)] if len(x) > sample else x
    centroids = train[rng.choice(len(train), size=cells, replace=False)].copy()
    for _ in range(iterations):
        assign = np.argmax(train @ centroids.T, axis=1)
        order = np.argsort(assign, kind="stable")
        used, starts = np.unique(assign[order], return_index=True)
        sums = np.zeros_like(centroids)
        sums[used] = np.add.reduceat(train[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        empty = norms[:, 0] == 0
        centroids = np.where(empty[:, None], centroids, sums / np.maximum(norms, 1e-12))
    return centroids


def similar_pairs_indexed(
    embeddings: np.ndarray, min_cos: float, *, nprobe: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) with dot product >= min_cos and their similarities: exact when small, else from an
    inverted-file index: every vector is filed under its nearest cell and compared with the vectors filed under
    its `nprobe` nearest cells."""
    x = np.asarray(embeddings, np.float32)
    n = len(x)
    if n <= EXACT_LIMIT:
        pairs = similar_pairs(x, min_cos)
        return pairs, np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]]) if len(pairs) else np.zeros(0, np.float32)
    # Filing costs n x cells and comparing n x nprobe x n / cells dot products: balanced near sqrt(nprobe x n).
    cells = max(16, int(np.sqrt(nprobe * n)))
    centroids = kmeans(x, cells, seed=seed)
    probes = np.empty((n, nprobe), np.int64)
    for start in range(0, n, 16384):
        sims = x[start : start + 16384] @ centroids.T
        rows = np.arange(len(sims))
        for k in range(nprobe):  # nearest cell first (where the vector is filed); argmax beats a partition here
            probes[start : start + 16384, k] = nearest = np.argmax(sims, axis=1)
            sims[rows, nearest] = -np.inf
    filed_order = np.argsort(probes[:, 0], kind="stable")
    filed_bounds = np.searchsorted(probes[filed_order, 0], np.arange(cells + 1))
    asking = np.repeat(np.arange(n), nprobe)
    asked = probes.ravel()
    ask_order = np.argsort(asked, kind="stable")
    asking, asked = asking[ask_order], asked[ask_order]
    ask_bounds = np.searchsorted(asked, np.arange(cells + 1))
    found, found_sims = [], []
    for c in range(cells):
        members = filed_order[filed_bounds[c] : filed_bounds[c + 1]]
        queries = asking[ask_bounds[c] : ask_bounds[c + 1]]
        if not len(members) or not len(queries):
            continue
        sims = x[queries] @ x[members].T
        i, j = np.nonzero(sims >= min_cos)
        a, b = queries[i], members[j]
        # A pair is met from a's side here, and from b's side too when b probes a's cell: then keep it once (a < b).
        met_twice = (probes[b] == probes[a, 0][:, None]).any(axis=1)
        once = (a != b) & ((a < b) | ~met_twice)
        found.append(np.stack([np.minimum(a, b)[once], np.maximum(a, b)[once]], axis=1).astype(np.int32))
        found_sims.append(sims[i[once], j[once]])
    if not found:
        return np.zeros((0, 2), np.int32), np.zeros(0, np.float32)
    return np.concatenate(found), np.concatenate(found_sims)
