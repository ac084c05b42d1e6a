"""Drives pixflow's S3-compatible endpoint with boto3 (an S3 client nobody here wrote).

Usage: python boto3_roundtrip.py ENDPOINT ACCESS_KEY SECRET_KEY [--checksums when_supported]

Uploads, heads, lists, ranges and downloads objects, uploads a 20 MB file in multipart (8 MB
parts) and downloads it byte-identical, checks error codes (bad signature, missing key, non-empty
bucket, If-None-Match), cleans up. Exits non-zero on the first failure; prints one line per check
and a closing tally.
"""

import hashlib
import os
import sys
import tempfile

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

endpoint, access, secret = sys.argv[1:4]
checksums = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--checksums" else "when_required"
passed = 0


def client(secret_key=secret):
    cfg = botocore.config.Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1, "mode": "standard"},
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=cfg,
    )


def check(name, cond, detail=""):
    global passed
    if not cond:
        print(f"FAIL {name} {detail}")
        print(f"s3 clients: {passed} passed, 1 failed")
        sys.exit(1)
    passed += 1
    print(f"ok   {name}")


def error_code(fn):
    try:
        fn()
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
    return None


s3 = client()
bucket = "ci-boto3"
s3.create_bucket(Bucket=bucket)
check("create_bucket then list_buckets", bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]])
check("create_bucket again", error_code(lambda: s3.create_bucket(Bucket=bucket)) == "BucketAlreadyOwnedByYou")

body = os.urandom(100_000)
put = s3.put_object(Bucket=bucket, Key="photos/a.bin", Body=body, ContentType="image/jpeg", Metadata={"origin": "ci"})
check("put_object ETag is the MD5", put["ETag"].strip('"') == hashlib.md5(body).hexdigest(), put["ETag"])
head = s3.head_object(Bucket=bucket, Key="photos/a.bin")
check("head_object", head["ContentLength"] == len(body) and head["ContentType"] == "image/jpeg", head)
check("user metadata", head["Metadata"] == {"origin": "ci"}, head["Metadata"])
got = s3.get_object(Bucket=bucket, Key="photos/a.bin")["Body"].read()
check("get_object round trip", got == body)
part = s3.get_object(Bucket=bucket, Key="photos/a.bin", Range="bytes=10-19")
check("ranged get", part["Body"].read() == body[10:20] and part["ContentRange"] == f"bytes 10-19/{len(body)}")
import datetime

future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
past = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
check("If-Modified-Since in the future", error_code(lambda: s3.get_object(Bucket=bucket, Key="photos/a.bin", IfModifiedSince=future)) == "304")
check(
    "If-Unmodified-Since in the past",
    error_code(lambda: s3.get_object(Bucket=bucket, Key="photos/a.bin", IfUnmodifiedSince=past)) == "PreconditionFailed",
)
check("If-None-Match on get", error_code(lambda: s3.get_object(Bucket=bucket, Key="photos/a.bin", IfNoneMatch=put["ETag"])) == "304")
check(
    "If-None-Match on put",
    error_code(lambda: s3.put_object(Bucket=bucket, Key="photos/a.bin", Body=b"x", IfNoneMatch="*"))
    == "PreconditionFailed",
)

for k in ["photos/b.bin", "photos/2026/c.bin", "docs/d.txt"]:
    s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
listed = s3.list_objects_v2(Bucket=bucket, Prefix="photos/", Delimiter="/")
check(
    "list_objects_v2 prefix and delimiter",
    [o["Key"] for o in listed["Contents"]] == ["photos/a.bin", "photos/b.bin"]
    and [p["Prefix"] for p in listed["CommonPrefixes"]] == ["photos/2026/"],
    listed,
)
pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
check("paginated listing", keys == sorted(["photos/a.bin", "photos/b.bin", "photos/2026/c.bin", "docs/d.txt"]), keys)

with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "big.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(20 * 1024 * 1024))
    mb = 1024 * 1024
    transfer = TransferConfig(multipart_threshold=8 * mb, multipart_chunksize=8 * mb, max_concurrency=2)
    s3.upload_file(src, bucket, "video/big.bin", Config=transfer)
    dst = os.path.join(tmp, "back.bin")
    s3.download_file(bucket, "video/big.bin", dst, Config=transfer)
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
    check("20 MB multipart upload, byte-identical download", digest(src) == digest(dst))
    check("multipart object size", s3.head_object(Bucket=bucket, Key="video/big.bin")["ContentLength"] == 20 * mb)

check("missing key", error_code(lambda: s3.get_object(Bucket=bucket, Key="nope")) == "NoSuchKey")
check("bad signature", error_code(lambda: client("wrong-secret-key-123").list_buckets()) == "SignatureDoesNotMatch")
check("non-empty bucket", error_code(lambda: s3.delete_bucket(Bucket=bucket)) == "BucketNotEmpty")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
deleted = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
check("delete_objects", len(deleted.get("Deleted", [])) == len(keys), deleted)
s3.delete_bucket(Bucket=bucket)
check("delete_bucket", bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]])
print(f"s3 clients: {passed} passed, 0 failed")
