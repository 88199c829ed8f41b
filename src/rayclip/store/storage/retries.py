"""How often an object store is asked: every S3 client rayclip builds retries each request up to
`max_attempts()` times with backoff ($RAYCLIP_S3_MAX_ATTEMPTS, default DEFAULT_S3_MAX_ATTEMPTS):
s3fs/botocore (`fsspec_options`), pyarrow's S3 client (`arrow_s3`, also in Ray Data's read and
write tasks), and, through AWS_MAX_ATTEMPTS/AWS_RETRY_MODE (`retry_env`), every process that builds
its own (img2dataset's, Ray's workers)."""

from __future__ import annotations

import functools
import os

from ...errors import UserError

S3_MAX_ATTEMPTS_ENV = "RAYCLIP_S3_MAX_ATTEMPTS"
DEFAULT_S3_MAX_ATTEMPTS = 10  # attempts per request: a 503 storm of about a minute is ridden out
DEFAULT_RETRY_MODE = "standard"  # botocore's and the AWS C++ SDK's own; $AWS_RETRY_MODE=adaptive also limits the rate


def max_attempts() -> int:
    """Attempts per object-store request: $RAYCLIP_S3_MAX_ATTEMPTS, else DEFAULT_S3_MAX_ATTEMPTS."""
    given = os.environ.get(S3_MAX_ATTEMPTS_ENV, "").strip()
    if not given:
        return DEFAULT_S3_MAX_ATTEMPTS
    if not given.isdigit() or int(given) < 1:
        raise UserError(f"${S3_MAX_ATTEMPTS_ENV}={given!r} must be a whole number of attempts, 1 or more")
    return int(given)


def retry_mode() -> str:
    return os.environ.get("AWS_RETRY_MODE") or DEFAULT_RETRY_MODE


def retry_env() -> dict[str, str]:
    """The environment that gives a process's own S3 clients our retries (botocore reads AWS_*;
    rayclip's own clients in Ray's workers read the knob)."""
    attempts = str(max_attempts())
    return {S3_MAX_ATTEMPTS_ENV: attempts, "AWS_MAX_ATTEMPTS": attempts, "AWS_RETRY_MODE": retry_mode()}


def fsspec_options(protocol: str) -> dict:
    """What an fsspec filesystem of `protocol` is built with: botocore's retries for S3."""
    if protocol not in ("s3", "s3a"):
        return {}
    return {"config_kwargs": {"retries": {"total_max_attempts": max_attempts(), "mode": retry_mode()}}}


@functools.cache
def _arrow_s3_class():
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        """pyarrow's S3 client with our retries, kept when pickled (Ray Data ships it to its read and
        write tasks; pyarrow's own pickle drops the retry strategy)."""

        def __init__(self, attempts: int, options: dict) -> None:
            super().__init__(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
            self.attempts, self.options = attempts, options

        def __reduce__(self):
            return arrow_s3, (self.attempts, self.options)

    return RetryingS3FileSystem


def arrow_s3(attempts: int, options: dict):
    """pyarrow's S3FileSystem(**options) retrying each request up to `attempts` times."""
    return _arrow_s3_class()(attempts, options)
