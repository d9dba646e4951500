"""The GPU tests: they run where CUDA is, and are skipped with a stated reason elsewhere (CI has no GPU).

``TEC_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead (every comparison then is CPU against CPU): a way to keep the
tests themselves from rotting on machines without a GPU, not a GPU check. ``TEC_GPU_TEST_REPORT=<file>`` appends the
measured errors and tolerances as JSON lines (``benchmarks/gpu_check.sh`` sets it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

NO_CUDA = ("CUDA is not available: the GPU tests run on a GPU machine (`pytest -m gpu`, or benchmarks/gpu_check.sh); "
           "TEC_GPU_TESTS_ON_CPU=1 runs them on the CPU to check the tests themselves")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" in item.nodeid.replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The CUDA device; the CPU under ``TEC_GPU_TESTS_ON_CPU=1``; else the test is skipped."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if os.environ.get("TEC_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip(NO_CUDA)


@pytest.fixture
def report(request: pytest.FixtureRequest, device: torch.device) -> Callable[..., None]:
    """``report(**numbers)``: record what a test measured (user property, and the JSON-lines report if set)."""

    def write(**numbers: Any) -> None:
        row = {"test": request.node.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "torch": torch.__version__, **numbers}
        for key, value in numbers.items():
            request.node.user_properties.append((key, value))
        print(json.dumps(row))
        if path := os.environ.get("TEC_GPU_TEST_REPORT"):
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return write
