"""The bucket settings and the download ranges, without a server: what an operator and a client see."""

from __future__ import annotations

import sys

import pytest

from atelier.api.replicate.downloads import MalformedRange, parse_ranges
from atelier.config import load_settings
from atelier.errors import SettingsError, StorageUnavailable
from atelier.jobs.blobs import (
    BucketURL,
    S3Blobs,
    S3Options,
    credentials_problem,
    describe_s3_error,
    role_available,
)


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://atelier-files", "atelier-files", ""),
        ("s3://atelier-files/", "atelier-files", ""),
        ("s3://atelier-files/prod/images/", "atelier-files", "prod/images"),
        ("s3://my.bucket-1/x", "my.bucket-1", "x"),
    ],
)
def test_a_bucket_url_is_a_bucket_and_a_prefix(url: str, bucket: str, prefix: str) -> None:
    assert BucketURL.parse(url) == BucketURL(bucket, prefix)


@pytest.mark.parametrize(
    "url", ["https://bucket.s3.amazonaws.com", "s3://", "s3://ab", "s3://Upper-Case", "/srv/files", "bucket/prefix"]
)
def test_anything_but_an_s3_url_is_one_problem_naming_the_variable(url: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({"files_url": url})
    (problem,) = refused.value.problems
    assert problem.field == "ATELIER_FILES_URL"
    assert problem.message.startswith(f"got {url[:80]!r}; give a bucket as s3://bucket or s3://bucket/prefix")


def test_no_files_url_is_the_data_folder_and_the_aws_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().files_url is None
    monkeypatch.setenv("ATELIER_FILES_URL", "s3://atelier-files/prefix/")
    monkeypatch.setenv("ATELIER_S3_ENDPOINT_URL", "http://minio:9000/")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    settings = load_settings()
    assert (settings.files_url, settings.s3_endpoint_url) == ("s3://atelier-files/prefix", "http://minio:9000")
    assert settings.aws_access_key_id == "AKIDEXAMPLE" and settings.aws_region == "eu-west-1"
    assert "wJalrXUtnFEMI" not in repr(settings)  # a secret


def test_a_bad_endpoint_is_one_problem_and_a_secret_is_never_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({"s3_endpoint_url": "minio:9000"})
    assert str(refused.value) == (
        "ATELIER_S3_ENDPOINT_URL: got 'minio:9000'; give the store's http:// or https:// address, e.g. http://minio:9000"
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x" * 5000)  # not a string a store would accept, but not repeated
    assert "x" * 40 not in str(load_settings().aws_secret_access_key)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (S3Options(access_key_id="AKID"), "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
        (S3Options(secret_access_key="s"), "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"),
        (S3Options(may_use_role=False), "no credentials are set; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        (S3Options(access_key_id="AKID", secret_access_key="s", may_use_role=False), None),
        (S3Options(), None),  # an instance role may answer
    ],
)
def test_credentials_that_cannot_work_are_named(options: S3Options, expected: str | None) -> None:
    problem = credentials_problem(options)
    assert problem == expected if expected is None else (problem or "").startswith(expected)


def test_a_role_is_possible_unless_metadata_is_disabled_and_no_role_variable_is_set() -> None:
    assert role_available({})
    assert not role_available({"AWS_EC2_METADATA_DISABLED": "true"})
    assert role_available({"AWS_EC2_METADATA_DISABLED": "true", "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token"})


def test_an_s3_error_is_one_line_with_its_code_and_a_hint() -> None:
    raw = (
        "Generic S3 error: Error performing PUT http://x/b/k in 3ms - Server returned non-2xx status code: 403 "
        'Forbidden: <?xml version="1.0"?>\n<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id '
        "you provided does not exist in our records.</Message></Error>\n\nDebug source:\nGeneric {...}"
    )
    said = describe_s3_error(Exception(raw), S3Options())
    assert said == (
        "InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records.; check AWS_ACCESS_KEY_ID"
    )


@pytest.mark.parametrize(
    ("header", "ranges"),
    [
        ("bytes=0-9", [(0, 10)]),
        ("bytes=90-", [(90, 100)]),
        ("bytes=-10", [(90, 100)]),
        ("bytes=95-200", [(95, 100)]),  # an end past the file is the end of the file
        ("bytes=0-0,5-9", [(0, 1), (5, 10)]),
        ("bytes=100-", [(100, 100)]),  # past the end: the caller answers 416
        ("bytes=x-3,2-3", [(2, 4)]),  # a part that is not numbers is ignored
    ],
)
def test_ranges_are_read_as_starlettes_file_response_reads_them(header: str, ranges: list[tuple[int, int]]) -> None:
    assert parse_ranges(header, 100) == ranges


@pytest.mark.parametrize("header", ["bytes", "items=0-9", "bytes=", "bytes=-", "bytes=9-3"])
def test_a_malformed_range_is_refused(header: str) -> None:
    with pytest.raises(MalformedRange):
        parse_ranges(header, 100)


def test_a_bucket_without_obstore_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("obstore", "obstore.store"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the s3 extra were not installed
    blobs = S3Blobs(BucketURL.parse("s3://atelier-files/p"), S3Options())
    with pytest.raises(StorageUnavailable, match=r"^s3://atelier-files/p needs obstore: pip install 'atelier\[s3\]'$"):
        blobs.probe()


def test_awss_own_endpoint_variables_are_read_after_atelier_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-aws-endpoint-url:9000")
    assert load_settings().s3_endpoint_url == "http://from-aws-endpoint-url:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://from-the-s3-one:9000")
    assert load_settings().s3_endpoint_url == "http://from-the-s3-one:9000"
    monkeypatch.setenv("ATELIER_S3_ENDPOINT_URL", "https://atelier-s:443")
    assert load_settings().s3_endpoint_url == "https://atelier-s:443"
    monkeypatch.setenv("ATELIER_S3_ENDPOINT_URL", "nope")
    with pytest.raises(SettingsError, match=r"^ATELIER_S3_ENDPOINT_URL: got 'nope'"):
        load_settings()
