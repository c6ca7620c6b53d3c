"""Credential and permission failures against a moto server with real request authentication.

moto enforces signatures and IAM policies once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have been served;
the first ones are used here to create a bucket, a user with a policy, and that user's access key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pbt_worker import PermanentStorageError, Segment
from pbt_worker.storage import reset_storage_cache

SETUP_ACTIONS = 5


@pytest.fixture(scope="module")
def auth_server(moto_server_factory: Any) -> Iterator[dict[str, Any]]:
    import boto3

    server = moto_server_factory({"INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)})
    try:
        kw = {"endpoint_url": server.endpoint, "region_name": "us-east-1",
              "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **kw)
        s3 = boto3.client("s3", **kw)
        s3.create_bucket(Bucket="secure")  # 1
        iam.create_user(UserName="trainer")  # 2
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::secure", "arn:aws:s3:::secure/*"]},
        ]}
        iam.put_user_policy(UserName="trainer", PolicyName="secure-only",
                            PolicyDocument=json.dumps(policy))  # 3
        key = iam.create_access_key(UserName="trainer")["AccessKey"]  # 4
        s3.create_bucket(Bucket="forbidden")  # 5: authentication starts after this one
        yield {"server": server, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        server.stop()


def _segment(uri: str) -> Segment:
    return Segment({"version": 1, "training": "t", "member": 0, "segment": 0, "hyperparameters": {},
                    "steps": {"start": 0, "budget": 1}, "restore": None, "checkpoint": uri,
                    "result": None, "gc": []})


def _use(monkeypatch: pytest.MonkeyPatch, server: Any, key: str, secret: str) -> None:
    for name, value in server.env(key, secret).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PBT_STORAGE_RETRY_SECONDS", "30")
    reset_storage_cache()


def test_valid_credentials_work(auth_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, auth_server["server"], auth_server["key"], auth_server["secret"])
    _segment("s3://secure/ok/").save({"fine": True})


@pytest.mark.parametrize(
    ("which", "expect"),
    [("unknown-key", "InvalidAccessKeyId"), ("wrong-secret", "SignatureDoesNotMatch")],
)
def test_bad_credentials_fail_fast(auth_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture, which: str, expect: str) -> None:
    if which == "unknown-key":
        _use(monkeypatch, auth_server["server"], "AKIANOSUCHKEY0000000", auth_server["secret"])
    else:
        _use(monkeypatch, auth_server["server"], auth_server["key"], "not-the-secret")
    start = time.monotonic()
    with pytest.raises(PermanentStorageError) as info:
        _segment("s3://secure/bad/").save(b"x")
    assert "retrying" not in caplog.text, "permanent errors must not be retried"
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert "invalid credentials" in message and expect in message and "s3://secure/bad/" in message


def test_access_denied_names_the_uri(auth_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    _use(monkeypatch, auth_server["server"], auth_server["key"], auth_server["secret"])
    start = time.monotonic()
    with pytest.raises(PermanentStorageError) as info:
        _segment("s3://forbidden/x/").save(b"x")
    assert "retrying" not in caplog.text and time.monotonic() - start < 60
    assert "access denied" in str(info.value) and "s3://forbidden/x/" in str(info.value)


def test_no_credentials_at_all(moto_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint)
    reset_storage_cache()
    try:
        with pytest.raises(PermanentStorageError, match="no usable AWS credentials"):
            _segment("s3://anything/x/").save(b"x")
    finally:
        reset_storage_cache()
