"""Temporary credentials (an assumed role: key, secret and session token) from the standard AWS environment
variables reach both S3 clients (s3fs for storage, pyarrow for the readers), against an S3 server that
checks them: a moto server in its own process with IAM authentication on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embindex.storage import Storage, StorageOptions, arrow_filesystem

ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
TRUST_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                                                                "Action": "sts:AssumeRole"}]})
SETUP_CALLS = 6  # requests the server lets through before it checks credentials


@pytest.fixture(scope="module")
def authenticating_s3():
    """(endpoint, bucket, temporary credentials of an assumed role)."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_CALLS))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.1)
        anon = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                    aws_secret_access_key="setup")
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="builder")
        iam.put_user_policy(UserName="builder", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="builder")["AccessKey"]
        iam.create_role(RoleName="indexer", AssumeRolePolicyDocument=TRUST_ALL)
        iam.put_role_policy(RoleName="indexer", PolicyName="all", PolicyDocument=ALLOW_ALL)
        user = dict(anon, aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        boto3.client("s3", **user).create_bucket(Bucket="temp-creds")  # the 6th unchecked call
        creds = boto3.client("sts", **user).assume_role(
            RoleArn="arn:aws:iam::123456789012:role/indexer", RoleSessionName="embindex-test")["Credentials"]
        yield endpoint, "temp-creds", creds
    finally:
        proc.kill()
        proc.wait()


def test_session_token_from_the_environment_reaches_both_clients(authenticating_s3, monkeypatch):
    endpoint, bucket, creds = authenticating_s3
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["SecretAccessKey"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", creds["SessionToken"])
    opts = StorageOptions()  # nothing in the config: the environment's temporary credentials

    store = Storage(f"s3://{bucket}/index", opts)  # s3fs
    store.write_text("a/b.txt", "hello")
    assert store.read_text("a/b.txt") == "hello"

    fs = arrow_filesystem(f"s3://{bucket}/corpus", opts)  # pyarrow's S3 client (readers, Parquet)
    pq.write_table(pa.table({"id": ["x"], "text": ["y"]}), f"{bucket}/corpus/part.parquet", filesystem=fs)
    assert pq.read_table(f"{bucket}/corpus/part.parquet", filesystem=fs).to_pylist() == [{"id": "x", "text": "y"}]

    # the server does check: the same key without its session token is refused
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    with pytest.raises(OSError):  # s3fs: PermissionError
        Storage(f"s3://{bucket}/index", StorageOptions()).read_text("a/b.txt")


def test_explicit_session_token_in_the_config(authenticating_s3, monkeypatch):
    endpoint, bucket, creds = authenticating_s3
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-stale-token-from-another-account")  # never mixed in
    opts = StorageOptions.from_dict({"endpoint_url": endpoint, "region": "us-east-1", "key": creds["AccessKeyId"],
                                     "secret": creds["SecretAccessKey"], "token": creds["SessionToken"]})
    store = Storage(f"s3://{bucket}/cfg", opts)
    store.write_text("t.txt", "ok")
    assert store.read_text("t.txt") == "ok"
    assert creds["SessionToken"] not in repr(opts)
