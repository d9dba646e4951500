"""Shared test set-up: fixtures live in tests/fixtures/ (one module per concern) and are loaded here."""

import os

import torch

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.s3",
    "tests.fixtures.data",
    "tests.fixtures.extract",
    "tests.fixtures.images",
    "tests.fixtures.train_runs",  # the training set-ups several modules only read
    "tests.faults.seed",  # the fault suite's seed, printed in the header and the summary
]

# Two cores: keep each test process to one intra-op thread so parallel Ray workers do not thrash.
torch.set_num_threads(int(os.environ.get("TEC_TEST_THREADS", "1")))
