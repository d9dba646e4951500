"""stages.uri_policy: allowed schemes, refused metadata addresses in every notation, the policy's own validation."""

from __future__ import annotations

import pickle

import pytest

from stages.uri_policy import DEFAULT_POLICY, UriPolicy, UriPolicyError, is_metadata_host, scheme_of

HTTP = UriPolicy(allowed_schemes=("file", "s3", "gs", "idx", "http", "https"))


@pytest.mark.parametrize("uri", ["/data/a.png", "relative/a.png", "file:///data/a.png", "s3://bucket/a.png",
                                 "S3://bucket/a.png", "s3a://bucket/a.png", "gs://b/a.png", "gcs://b/a.png",
                                 "local:///data/a.png", "idx:///data/train-images-idx3-ubyte.gz#3"])
def test_default_schemes_are_accepted(uri: str) -> None:
    DEFAULT_POLICY.check(uri)


@pytest.mark.parametrize("uri", ["http://example.com/a.png", "https://example.com/a.png", "memory://a.png",
                                 "ftp://example.com/a.png", "simplecache::s3://bucket/a.png",
                                 "zip://a.png::file:///data/x.zip", "hdfs://namenode/a.png"])
def test_other_schemes_are_refused_naming_the_setting(uri: str) -> None:
    with pytest.raises(UriPolicyError, match=r"scheme '.+' is not allowed .*\(data\.allowed_schemes\)") as info:
        DEFAULT_POLICY.check(uri)
    assert info.value.uri == uri and str(info.value).startswith(uri)


def test_every_part_of_a_chained_url_must_be_allowed() -> None:
    policy = UriPolicy(allowed_schemes=("simplecache", "s3", "file"))
    policy.check("simplecache::s3://bucket/a.png")
    with pytest.raises(UriPolicyError, match="'https'"):
        policy.check("simplecache::https://example.com/a.png")


METADATA = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://169.254.170.2/v2/credentials",  # ECS task role endpoint (link-local too)
    "https://169.254.169.254:443/",
    "http://user@169.254.169.254/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1%25eth0]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://2852039166/",  # 169.254.169.254 as one decimal number
    "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/",  # octal dotted
    "http://169.254.43518/",  # class-B shorthand
    "http://%31%36%39.254.169.254/",  # percent-encoded
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.google.internal./computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
    "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud
    "simplecache::http://169.254.169.254/",
]


@pytest.mark.parametrize("uri", METADATA)
def test_metadata_and_link_local_addresses_are_refused_even_when_http_is_allowed(uri: str) -> None:
    policy = UriPolicy(allowed_schemes=(*HTTP.allowed_schemes, "simplecache"))
    with pytest.raises(UriPolicyError, match="link-local or cloud-metadata address"):
        policy.check(uri)


@pytest.mark.parametrize("uri", ["http://example.com/a.png", "https://8.8.8.8/a.png", "http://[2001:db8::1]/a.png",
                                 "http://169.253.1.1/a.png", "http://10.0.0.5:8080/a.png", "https://metadata.example/x"])
def test_ordinary_hosts_pass_when_http_is_allowed(uri: str) -> None:
    HTTP.check(uri)


def test_is_metadata_host_on_bare_names() -> None:
    assert is_metadata_host("169.254.169.254") and is_metadata_host("[fd00:ec2::254]")
    assert not is_metadata_host("example.com") and not is_metadata_host("127.0.0.1")


def test_policy_values_are_normalised_and_checked() -> None:
    assert UriPolicy(allowed_schemes=["S3://", "gcs", "local", "s3"]).allowed_schemes == ("s3", "gs", "file")
    assert scheme_of("/a/b.png") == "file" and scheme_of("S3A://b/k") == "s3"
    with pytest.raises(ValueError, match=r"data\.allowed_schemes: 'not a scheme'"):
        UriPolicy(allowed_schemes=("not a scheme",))
    for name in ("max_image_bytes", "max_image_pixels", "max_idx_bytes"):
        with pytest.raises(ValueError, match=rf"data\.{name}: expected a positive integer"):
            UriPolicy(**{name: 0})
    err = pickle.loads(pickle.dumps(UriPolicyError("u", "allowed_schemes", "why")))
    assert (err.uri, err.setting, err.message) == ("u", "allowed_schemes", "why")
    assert str(err) == "u: why (data.allowed_schemes)"


def test_policy_of_a_config_section() -> None:
    from pipeline.config_schema import DataConfig

    assert UriPolicy.of(DataConfig()) == DEFAULT_POLICY
    data = DataConfig(allowed_schemes=["file", "https"], max_image_bytes=10, max_image_pixels=20, max_idx_bytes=30)
    assert UriPolicy.of(data) == UriPolicy(("file", "https"), 10, 20, 30)
