"""Fitting every layer's scorer at once: a batched MLP (or linear map) regressed on log labels with Adam.

Inputs are standardised per layer and feature for training; the standardisation is folded into the first
layer's weights of the result, so the saved scorer takes raw attention inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FitResult:
    """The fitted tensors (file layout of :mod:`kvcompress_learned.scorer`) and how well they fit."""

    tensors: dict[str, torch.Tensor]
    train_loss: float
    val_loss: float
    val_spearman: float  # mean over layers and heads of the rank correlation on the validation tokens


def _forward(x: torch.Tensor, p: dict[str, torch.Tensor], units: int) -> torch.Tensor:
    """Scores ``[L, N, H]`` of standardised inputs ``[L, N, F]``."""
    z = torch.baddbmm(p["b1"].unsqueeze(1), x, p["w1"])
    return torch.baddbmm(p["b2"].unsqueeze(1), F.gelu(z), p["w2"]) if units else z


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).float()


def spearman(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean rank correlation over the leading dims of ``[..., N]`` predictions and targets."""
    a, b = _ranks(pred), _ranks(target)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-9)).mean())


def fit(features: torch.Tensor, targets: torch.Tensor, train: torch.Tensor, val: torch.Tensor, units: int,
        epochs: int, seed: int, lr: float = 3e-3, batch: int = 2048, weight_decay: float = 1e-4,
        progress: bool = True) -> FitResult:
    """Fit scorers to ``targets`` ``[L, H, T]`` from ``features`` ``[L, T, F]`` on the token indices
    ``train``; report the loss and rank correlation on ``val``. Deterministic for a given ``seed``."""
    from tqdm.auto import tqdm

    layers, _, nf = features.shape
    heads = targets.shape[1]
    g = torch.Generator().manual_seed(seed)
    x_train = features[:, train].float()
    mu, sd = x_train.mean(1, keepdim=True), x_train.std(1, keepdim=True).clamp(min=1e-4)
    del x_train
    width = units or heads
    p = {"w1": torch.randn(layers, nf, width, generator=g) / nf**0.5, "b1": torch.zeros(layers, width)}
    if units:
        p["w2"] = torch.randn(layers, units, heads, generator=g) / units**0.5
        p["b2"] = targets[:, :, train].mean(-1)
    else:
        p["b1"] = targets[:, :, train].mean(-1)
    for t in p.values():
        t.requires_grad_(True)
    opt = torch.optim.AdamW(p.values(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((train.numel() + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="fit", unit="step", disable=not progress)
    train_loss = float("nan")
    for _ in range(epochs):
        order = train[torch.randperm(train.numel(), generator=g)]
        total, n = 0.0, 0
        for s in range(0, order.numel(), batch):
            idx = order[s:s + batch]
            x = (features[:, idx].float() - mu) / sd
            loss = F.mse_loss(_forward(x, p, units), targets[:, :, idx].transpose(1, 2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * idx.numel(), n + idx.numel()
            bar.update(1)
        train_loss = total / n
        bar.set_postfix(loss=f"{train_loss:.4f}")
    bar.close()
    with torch.no_grad():
        pred = torch.cat([_forward((features[:, val[s:s + batch]].float() - mu) / sd, p, units)
                          for s in range(0, val.numel(), batch)], 1).transpose(1, 2)  # [L, H, V]
        want = targets[:, :, val]
        val_loss = float(F.mse_loss(pred, want)) if val.numel() else float("nan")
        rho = spearman(pred, want) if val.numel() > 1 else float("nan")
        w1 = p["w1"] / sd.transpose(1, 2)  # fold the standardisation into the first layer
        b1 = p["b1"] - torch.bmm(mu / sd, p["w1"]).squeeze(1)
        tensors = {"w1": w1.detach(), "b1": b1.detach()}
        if units:
            tensors["w2"] = p["w2"].detach()
            tensors["b2"] = p["b2"].detach()
    return FitResult(tensors, train_loss, val_loss, rho)


def predict(features: torch.Tensor, tensors: dict[str, torch.Tensor], index: torch.Tensor,
            batch: int = 4096) -> torch.Tensor:
    """Scores ``[L, H, N]`` of the tokens ``index`` by a fitted scorer (file layout, raw inputs)."""
    out = []
    with torch.no_grad():
        for s in range(0, index.numel(), batch):
            x = features[:, index[s:s + batch]].float()
            z = torch.baddbmm(tensors["b1"].float().unsqueeze(1), x, tensors["w1"].float())
            if "w2" in tensors:
                z = torch.baddbmm(tensors["b2"].float().unsqueeze(1), F.gelu(z), tensors["w2"].float())
            out.append(z)
    return torch.cat(out, 1).transpose(1, 2)
