"""Batched weighted k-means (Lloyd) in torch: one independent problem per row of ``[N, S, D]``.

Points with weight 0 take no part (padding, protected tokens); a weight > 1 counts a point that many times
(a merged slot standing for several tokens). ``distance`` is ``"l2"`` (plain k-means) or ``"cosine"``
(spherical k-means: points and centroids on the unit sphere, nearest = largest dot product). Assignment
and update are matmuls (the update multiplies a one-hot assignment by the points), so a GPU run is
deterministic too and costs a few launches per iteration, whatever C.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def prepare(x: torch.Tensor, distance: str) -> torch.Tensor:
    """The points as the metric sees them: float32, on the unit sphere for ``cosine``."""
    x = x.float()
    return F.normalize(x, dim=-1) if distance == "cosine" else x


def assign(x: torch.Tensor, centroids: torch.Tensor, distance: str) -> torch.Tensor:
    """Nearest centroid ``[N, S]`` (int64) of each prepared point ``x`` ``[N, S, D]``."""
    dots = torch.bmm(x, centroids.transpose(1, 2))  # [N, S, C]
    if distance == "cosine":
        return dots.argmax(-1)
    return (centroids.square().sum(-1).unsqueeze(1) - 2 * dots).argmin(-1)  # |x|^2 is the same for every c


def update(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
           distance: str) -> torch.Tensor:
    """Weighted means of each cluster's points (normalised for ``cosine``); an empty cluster keeps its
    centroid."""
    c = centroids.shape[1]
    onehot = F.one_hot(labels, c).to(x.dtype) * weight.unsqueeze(-1)  # [N, S, C]
    sums = torch.bmm(onehot.transpose(1, 2), x)  # [N, C, D]
    mass = onehot.sum(1).unsqueeze(-1)  # [N, C, 1]
    means = F.normalize(sums, dim=-1) if distance == "cosine" else sums / mass.clamp(min=1e-30)
    return torch.where(mass > 0, means, centroids)


def lloyd(x: torch.Tensor, weight: torch.Tensor, centroids: torch.Tensor, iters: int,
          distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd iterations from ``centroids`` ``[N, C, D]`` over prepared points ``x`` ``[N, S, D]``
    weighted by ``weight`` ``[N, S]``; returns the centroids and the final assignment ``[N, S]``."""
    for _ in range(iters):
        centroids = update(x, weight, assign(x, centroids, distance), centroids, distance)
    return centroids, assign(x, centroids, distance)


def kmeans_pp(x: torch.Tensor, weight: torch.Tensor, clusters: int, noise: Callable[[int], torch.Tensor],
              distance: str) -> torch.Tensor:
    """k-means++ seeding ``[N, C, D]``: the first centroid drawn with probability proportional to weight,
    each next one to weight x squared distance to the nearest centroid so far. Draw ``i`` is a Gumbel-max
    over ``noise(i)`` ``[N, S]`` (uniform in (0, 1)), so the caller decides what the randomness depends on."""
    n, s, d = x.shape

    def draw(i: int, p: torch.Tensor) -> torch.Tensor:
        gumbel = -torch.log(-torch.log(noise(i)))
        return (p.clamp(min=1e-30).log() + gumbel).masked_fill(p <= 0, float("-inf")).argmax(-1, keepdim=True)

    pick = draw(0, weight)
    chosen = [x.gather(1, pick.unsqueeze(-1).expand(n, 1, d))]
    nearest = _sq_dist(x, chosen[0], distance)
    for i in range(1, clusters):
        pick = draw(i, weight * nearest)
        chosen.append(x.gather(1, pick.unsqueeze(-1).expand(n, 1, d)))
        nearest = torch.minimum(nearest, _sq_dist(x, chosen[-1], distance))
    return torch.cat(chosen, 1)


def hashed_uniform(seed: int, rows: torch.Tensor, tokens: torch.Tensor, draw: int) -> torch.Tensor:
    """Uniform numbers in (0, 1) ``[N, S]`` that depend only on ``(seed, rows[N], tokens[N, S], draw)``: the
    same token of the same head draws the same number in any batch, with any padding, on any device."""
    mask = 0xFFFFFFFF  # every product below stays under 2**63: no int64 overflow on any device
    salt = ((seed & mask) * 0x27D4EB2F + (draw & mask) * 0x165667B1) & mask
    h = ((tokens.long() & mask) * 0x1E3779B1 + (rows.long().unsqueeze(-1) & mask) * 0x05EBCA77 + salt) & mask
    for mul in (0x7FEB352D, 0x5BD1E995):  # a 32-bit integer finaliser (xor-shift-multiply)
        h = ((h ^ (h >> 16)) * mul) & mask
    h = h ^ (h >> 16)
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def _sq_dist(x: torch.Tensor, c: torch.Tensor, distance: str) -> torch.Tensor:
    """Squared distance ``[N, S]`` of each point to one centroid ``c`` ``[N, 1, D]`` (``2 - 2 cos`` on the
    sphere)."""
    if distance == "cosine":
        return (2 - 2 * (x * c).sum(-1)).clamp(min=0)
    return (x - c).square().sum(-1)


def inertia(x: torch.Tensor, weight: torch.Tensor, centroids: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    """Weighted sum of squared distances of each point to its centroid, per row ``[N]``."""
    d = x.shape[-1]
    own = centroids.gather(1, labels.unsqueeze(-1).expand(*labels.shape, d))
    return ((x - own).square().sum(-1) * weight).sum(-1)
