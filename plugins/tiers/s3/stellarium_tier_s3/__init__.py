"""The ``s3`` tier: one object per chunk in any S3-compatible store (boto3).

Objects are ``<prefix><hex[:2]>/<hex>``. The client is made on first use, so
reading the host config never touches the network. Connection failures and
server errors become :class:`TierUnavailable` (the router retries those);
boto3's own retries are kept short so the router's backoff is what governs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from stellarium_core.config import Field, at_least, validate_params
from stellarium_core.errors import ConfigError, StellarError
from stellarium_core.hookspecs import TierContext, TierUnavailable, TierUsage, hookimpl


def _prefix_ok(value: str) -> str | None:
    if value.startswith("/"):
        return "must not start with '/'"
    return None


FIELDS = {
    "bucket": Field(str, doc="bucket name"),
    "prefix": Field(str, "stellarium/chunks/", _prefix_ok, doc="key prefix for chunk objects"),
    "endpoint_url": Field(str, "", doc="S3 endpoint (empty: AWS)"),
    "region": Field(str, "us-east-1"),
    "access_key_id": Field(str, "", doc="empty: boto3's default credential chain"),
    "secret_access_key": Field(str, ""),
    "create_bucket": Field(bool, False, doc="create the bucket on first use if missing"),
    "connect_timeout": Field(float, 5.0, lambda v: None if v > 0 else "must be > 0"),
    "read_timeout": Field(float, 30.0, lambda v: None if v > 0 else "must be > 0"),
    "max_attempts": Field(int, 2, at_least(1), doc="boto3 attempts per request"),
}
_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3Tier:
    """Chunks as S3 objects; thread-safe (one boto3 client shared by threads)."""

    name = "s3"

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = validate_params(params, FIELDS)
        if bool(self.params["access_key_id"]) != bool(self.params["secret_access_key"]):
            raise ConfigError("give both access_key_id and secret_access_key, or neither",
                              key="secret_access_key")
        self.bucket: str = self.params["bucket"]
        prefix = self.params["prefix"]
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 client, made (and the bucket made, if asked) on first use."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                p = self.params
                self._client = boto3.client(
                    "s3",
                    endpoint_url=p["endpoint_url"] or None,
                    region_name=p["region"],
                    aws_access_key_id=p["access_key_id"] or None,
                    aws_secret_access_key=p["secret_access_key"] or None,
                    config=Config(connect_timeout=p["connect_timeout"],
                                  read_timeout=p["read_timeout"],
                                  retries={"max_attempts": p["max_attempts"],
                                           "mode": "standard"},
                                  s3={"addressing_style": "path"}),
                )
                if p["create_bucket"]:
                    self._ensure_bucket(self._client)
            return self._client

    def _ensure_bucket(self, client: Any) -> None:
        from botocore.exceptions import ClientError

        try:
            client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _MISSING and _code(exc) != "NoSuchBucket":
                raise self._error("head_bucket", exc) from None
        except Exception as exc:
            raise self._error("head_bucket", exc) from None
        try:  # outside the handlers above, so a refusal is mapped too, not raised raw
            client.create_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._error("create_bucket", exc) from None

    def _key(self, key: bytes) -> str:
        h = key.hex()
        return f"{self.prefix}{h[:2]}/{h}"

    def _error(self, op: str, exc: BaseException) -> StellarError:
        """Map a boto3 failure to the tier contract's errors."""
        from botocore.exceptions import ClientError

        where = f"s3 tier {self.params['endpoint_url'] or 'aws'}/{self.bucket}: {op}"
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            msg = f"{where}: {_code(exc)} {exc.response.get('Error', {}).get('Message', '')}"
            if status >= 500 or _code(exc) in ("SlowDown", "RequestTimeout"):
                return TierUnavailable(msg.rstrip())
            return StellarError(msg.rstrip())
        return TierUnavailable(f"{where}: {type(exc).__name__}: {exc}")

    def _call(self, op: str, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(Bucket=self.bucket, **kw)
        except (BotoCoreError, ClientError, OSError) as exc:
            if isinstance(exc, ClientError) and _code(exc) in _MISSING:
                return None
            raise self._error(op, exc) from None

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        self._call("put_object", Key=self._key(key), Body=bytes(data))

    def get(self, key: bytes) -> bytes | None:
        from botocore.exceptions import BotoCoreError

        resp = self._call("get_object", Key=self._key(key))
        if resp is None:
            return None
        try:
            return resp["Body"].read()
        except (BotoCoreError, OSError) as exc:
            raise self._error("get_object", exc) from None

    def contains(self, key: bytes) -> bool:
        return self._call("head_object", Key=self._key(key)) is not None

    def delete(self, key: bytes) -> None:
        self._call("delete_object", Key=self._key(key))

    def _objects(self) -> Iterator[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                yield from page.get("Contents", ())
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._error("list_objects_v2", exc) from None

    def keys(self) -> Iterator[bytes]:
        for obj in self._objects():
            try:
                yield bytes.fromhex(obj["Key"].rsplit("/", 1)[-1])
            except ValueError:
                continue  # someone else's object under our prefix

    def usage(self) -> TierUsage:
        n = used = 0
        for obj in self._objects():
            n += 1
            used += obj.get("Size", 0)
        return TierUsage(n, used, None)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@hookimpl
def stellarium_tier(name: str, params: dict[str, Any], context: TierContext) -> S3Tier | None:
    return S3Tier(params) if name == "s3" else None
