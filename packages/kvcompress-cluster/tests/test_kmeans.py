"""The batched k-means against scikit-learn's KMeans (L2) and a plain loop (cosine), from the same initial
centroids; seeding and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from kvcompress_cluster import kmeans


def _data(rows: int, points: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(rows, 5, dim, generator=g) * 3
    pick = torch.randint(0, 5, (rows, points), generator=g)
    noise = torch.randn(rows, points, dim, generator=g)
    return centers.gather(1, pick.unsqueeze(-1).expand(rows, points, dim)) + noise


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("iters", [1, 3, 10])
def test_l2_inertia_matches_sklearn_from_the_same_start(weighted, iters):
    rows, points, dim, c = 6, 80, 8, 6
    x = _data(rows, points, dim, seed=iters)
    g = torch.Generator().manual_seed(1)
    weight = torch.randint(1, 5, (rows, points), generator=g).float()
    if not weighted:
        weight = torch.ones(rows, points)
    start = x[:, torch.randperm(points, generator=g)[:c]]
    centroids, labels = kmeans.lloyd(x, weight, start, iters, "l2")
    ours = kmeans.inertia(x, weight, centroids, labels)
    for r in range(rows):
        ref = KMeans(n_clusters=c, init=start[r].double().numpy(), n_init=1, max_iter=iters, tol=0.0,
                     algorithm="lloyd").fit(x[r].double().numpy(), sample_weight=weight[r].double().numpy())
        assert abs(float(ours[r]) - ref.inertia_) <= 0.01 * ref.inertia_, (r, float(ours[r]), ref.inertia_)
        if iters == 10:  # converged: the same partition
            assert np.array_equal(labels[r].numpy(), ref.labels_)


def test_zero_weight_points_take_no_part():
    x = _data(2, 40, 4, seed=3)
    weight = torch.ones(2, 40)
    weight[:, 30:] = 0
    start = x[:, :4]
    with_far = x.clone()
    with_far[:, 30:] += 100.0  # far away, but weightless: the centroids must not move towards them
    a, _ = kmeans.lloyd(x, weight, start, 5, "l2")
    b, _ = kmeans.lloyd(with_far, weight, start, 5, "l2")
    torch.testing.assert_close(a, b)


def _cosine_reference(x: np.ndarray, start: np.ndarray, iters: int) -> np.ndarray:
    """Spherical k-means written plainly: unit points, nearest = largest dot, centroid = unit mean."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = start.copy()
    for _ in range(iters):
        labels = (x @ c.T).argmax(1)
        for j in range(len(c)):
            if (labels == j).any():
                m = x[labels == j].sum(0)
                c[j] = m / np.linalg.norm(m)
    return c


def test_cosine_matches_a_plain_spherical_kmeans():
    x = _data(3, 60, 8, seed=5)
    points = kmeans.prepare(x, "cosine")
    start = points[:, :5].clone()
    centroids, labels = kmeans.lloyd(points, torch.ones(3, 60), start, 4, "cosine")
    for r in range(3):
        ref = _cosine_reference(x[r].double().numpy(), start[r].double().numpy(), 4)
        np.testing.assert_allclose(centroids[r].numpy(), ref, rtol=1e-4, atol=1e-5)
        assert np.array_equal(labels[r].numpy(), (points[r].numpy() @ ref.T).argmax(1))


def test_kmeans_pp_is_seeded_and_picks_weighted_points():
    x = _data(4, 50, 6, seed=7)
    weight = torch.ones(4, 50)
    weight[:, :10] = 0  # never picked
    rows, tokens = torch.arange(4), torch.arange(50).expand(4, 50)

    def seeded(seed):
        return kmeans.kmeans_pp(x, weight, 8, lambda i: kmeans.hashed_uniform(seed, rows, tokens, i), "l2")

    a, b, other = seeded(3), seeded(3), seeded(4)
    assert torch.equal(a, b) and not torch.equal(a, other)
    picked = (a.unsqueeze(2) == x.unsqueeze(1)).all(-1)  # [rows, C, points]
    assert picked.any(-1).all() and not picked[..., :10].any()
    assert (picked.sum(-1) >= 1).all()
