"""Frozen-feature probes: weighted k-NN and an L-BFGS linear probe, top-1 on (features, labels) tensors.

Pure torch on already extracted features (no images, no checkpoints): :mod:`pipeline.evaluate` feeds them the
encoder's features, and the base diagnostics (``inspect-base``) use the k-NN on the base's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


@torch.inference_mode()
def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int = 10,
    chunk_bytes: int = 1 << 28,
) -> float:
    """Weighted k-NN top-1 as in DINO: cosine similarity, top-k neighbours, votes ``exp(sim / T)``.

    Args:
        train_feats: (N, D); train_labels: (N,) ints in [0, num_classes).
        test_feats: (M, D); test_labels: (M,).
        k: neighbours (clipped to N).
        temperature: T of the vote weights.
        num_classes: C.
        chunk_bytes: bound on the (chunk, N) similarity block's memory.

    Returns:
        Fraction of test samples whose weighted vote equals the label.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    k = min(k, train.shape[0])
    chunk = max(1, chunk_bytes // (4 * max(1, train.shape[0])))
    correct = 0
    for lo in range(0, test.shape[0], chunk):
        sim, idx = (test[lo:lo + chunk] @ train.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[lo:lo + chunk]).sum())
    return correct / max(1, test.shape[0])


def linear_probe_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 500,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    seed: int = 0,
    num_classes: int | None = None,
    details: dict[str, Any] | None = None,
) -> float:
    """Multinomial logistic regression on frozen, standardised features; returns test top-1.

    Features are standardised with the train mean/std (MAE's probe uses an affine-free BatchNorm: the same map).
    The convex objective (mean cross-entropy + ``weight_decay/2 · ||W||²``) is minimised full-batch with L-BFGS
    (strong-Wolfe line search), as CLIP's sklearn probe does, so the result depends on the data, not on a
    learning-rate schedule. Deterministic on CPU for a fixed thread count.

    Args:
        train_feats: (N, D); train_labels: (N,).
        test_feats: (M, D); test_labels: (M,).
        epochs: L-BFGS iterations (each at least one full pass over the train features).
        lr: L-BFGS step scale.
        weight_decay: L2 penalty on the weights (not the bias).
        seed: seeds the small random initialisation.
        num_classes: C; default ``max(label) + 1``.
        details: if given, filled with ``train_top1``, ``loss`` and ``iterations``.

    Returns:
        Test top-1 as a fraction.
    """
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    mean, std = train_feats.float().mean(0), train_feats.float().std(0, unbiased=False).clamp_min(1e-6)
    x, x_test = (train_feats.float() - mean) / std, (test_feats.float() - mean) / std
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, x.shape[1], generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        return F.cross_entropy(F.linear(x, weight, bias), train_labels) + 0.5 * weight_decay * weight.square().sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        test_top1 = float((F.linear(x_test, weight, bias).argmax(1) == test_labels).float().mean())
        if details is not None:
            details.update(train_top1=float((F.linear(x, weight, bias).argmax(1) == train_labels).float().mean()),
                           loss=float(objective()), iterations=int(opt.state[weight].get("n_iter", 0)))
    return test_top1
