"""Frozen-feature probes: k-NN and linear probe are right on known answers (perfect, chance, deterministic)."""

import pytest
import torch

from pipeline.probes import knn_top1, linear_probe_top1


def clusters(n: int, labels: torch.Tensor, seed: int = 0, noise: float = 0.3, dim: int = 32) -> torch.Tensor:
    """(n, dim) points around 10 random centres of norm 3 (class = label); separable at the default noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(10, dim, generator=torch.Generator().manual_seed(99)), dim=1)
    return 3 * centres[labels] + noise * torch.randn(n, dim, generator=gen)


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_separable_is_perfect_and_random_labels_are_chance(method):
    probe = knn_top1 if method == "knn" else linear_probe_top1
    gen = torch.Generator().manual_seed(1)
    y_train, y_test = torch.randint(0, 10, (2000,), generator=gen), torch.randint(0, 10, (1000,), generator=gen)
    x_train, x_test = clusters(2000, y_train, seed=2), clusters(1000, y_test, seed=3)
    assert probe(x_train, y_train, x_test, y_test) == 1.0
    noise_train, noise_test = torch.randn(2000, 32, generator=gen), torch.randn(1000, 32, generator=gen)
    chance = probe(noise_train, y_train, noise_test, y_test)
    assert abs(chance - 0.1) < 0.05  # 1000 test samples: one standard error is ~0.01
    assert probe(noise_train, y_train, noise_test, y_test) == chance  # deterministic


def test_knn_chunking_does_not_change_the_answer():
    gen = torch.Generator().manual_seed(4)
    y_train, y_test = torch.randint(0, 10, (500,), generator=gen), torch.randint(0, 10, (300,), generator=gen)
    x_train, x_test = clusters(500, y_train, 5, noise=1.0), clusters(300, y_test, 6, noise=1.0)  # overlapping
    whole = knn_top1(x_train, y_train, x_test, y_test)
    assert 0.3 < whole < 1.0
    assert knn_top1(x_train, y_train, x_test, y_test, chunk_bytes=4 * 500 * 7) == whole
