"""The config's input policy (data.allowed_schemes, data.max_*) and extract.max_failed_fraction reach the job."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config, to_extract_job
from stages.uri_policy import DEFAULT_POLICY, UriPolicy


def test_defaults_reach_the_extract_job() -> None:
    job = to_extract_job(load_config(None), "c", "m", "b")
    assert job.uri_policy == DEFAULT_POLICY and job.max_failed_fraction == 0.05


def test_overrides_reach_the_extract_job() -> None:
    cfg = load_config(None, ['data.allowed_schemes=["file", "HTTPS"]', "data.max_image_bytes=1000",
                             "data.max_image_pixels=2000", "data.max_idx_bytes=3000",
                             "extract.max_failed_fraction=0.2"])
    job = to_extract_job(cfg, "c", "m", "b")
    assert job.uri_policy == UriPolicy(("file", "https"), 1000, 2000, 3000)
    assert job.max_failed_fraction == 0.2


@pytest.mark.parametrize("override", ["data.max_image_bytes=0", "data.max_idx_bytes=-1", "data.allowed_schemes=s3",
                                      "extract.max_failed_fraction=-0.5"])
def test_bad_values_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])
