"""Where a service's durable state lives: a local folder, or a prefix in an object store (`s3://`).

The state (state.py) is a few small objects: `identity.json` (written once), `mix_log.jsonl` (appended),
`frontier.json` (replaced) and `owner.json` (who owns the state, ownership.py). A store gives each the
write it needs, durable before it returns:

- `create(name, data)`: only if the object does not exist yet (`AlreadyExists` otherwise);
- `replace(name, data)`: the whole object, atomically;
- `append(name, line)`: one line at the end.

Local folder: files written atomically and fsynced (pipeline/atomic_file.py), the log appended with
O_APPEND and fsync, exactly as state dirs always were. A second writer is excluded by the file lock of
ownership.py, so the writes need no condition.

Object store: every write is conditional on the version this process last read or wrote of that object
(S3's `If-Match: <etag>`, or `If-None-Match: *` for one it saw absent). A process that is no longer the
owner can therefore never overwrite what the new owner wrote: its write is refused (`Superseded`), which
is never retried into a second writer, and the service stops. An append on an object store is a
conditional replace of the whole log (logs are kilobytes to a few megabytes). S3, MinIO and GCS's XML API
in S3 mode honour the conditions; moto's server (the tests' store) checks both headers on PutObject.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from pipeline.atomic_file import fsync_dir, write_atomically
from pipeline.storage import is_uri, parse_location
from service.errors import ServiceError

WRITE_ATTEMPTS = 4  # an object-store request that failed on the way (connection, 5xx) is tried again
RETRY_BACKOFF_S = 0.25
T = TypeVar("T")


class StateError(ServiceError):
    """The state dir is unusable or belongs to other inputs; the message names the file and the fix."""

    http_status = 503  # mid-request: the state could not be written (its store down, or ownership lost)


class AlreadyExists(StateError):
    """`create` of an object that exists."""


class Superseded(StateError):
    """A conditional write refused: another process wrote the object since this one read it, so this
    process is no longer the state's owner. Never retried."""


class StateStore(Protocol):
    """The objects of one state, by name (`identity.json`, ...). `uri` is what the user gave."""

    uri: str

    def read(self, name: str) -> bytes | None: ...

    def create(self, name: str, data: bytes) -> None: ...

    def replace(self, name: str, data: bytes) -> None: ...

    def append(self, name: str, line: bytes) -> None: ...

    def where(self, name: str) -> str: ...


def open_store(state_dir: str | os.PathLike) -> "StateStore":
    """The store of `--state-dir`: a local folder (created if missing) or `s3://bucket/prefix`."""
    if not is_uri(state_dir):
        return LocalStore(Path(state_dir))
    location = parse_location(state_dir)
    if location.scheme != "s3":
        raise StateError(
            f"--state-dir {state_dir}: a state in {location.scheme}:// is not supported yet (its conditional writes "
            "are not wired); use a local or shared folder, or s3://BUCKET/PREFIX (any S3-compatible store)"
        )
    bucket, _, prefix = location.path.partition("/")
    return S3Store(bucket, prefix.strip("/"))


class LocalStore:
    """A state dir on a local or shared filesystem."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def make(self) -> None:
        """Create the folder (when its owner takes it: a refused start writes nothing)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"--state-dir {self.root}: cannot create it ({e}); give a folder this user can write") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StateError(f"--state-dir {self.root}: not writable by this user; give a folder it can write")

    def where(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"{self.root / name}: unreadable ({e}); restore it from a backup or use a new --state-dir") from e

    def create(self, name: str, data: bytes) -> None:
        if (self.root / name).exists():
            raise AlreadyExists(f"{self.root / name}: exists already")
        write_atomically(self.root / name, data)

    def replace(self, name: str, data: bytes) -> None:
        write_atomically(self.root / name, data)

    def append(self, name: str, line: bytes) -> None:
        path = self.root / name
        new = not path.exists()
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.root)


class S3Store:
    """A state under `s3://bucket/prefix/`, written only by conditional requests (see the module doc).

    The endpoint and credentials come from the environment as for datasets (pipeline/storage.py):
    `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for an S3-compatible store, the usual credential chain.
    """

    def __init__(self, bucket: str, prefix: str):
        import boto3  # a dependency of the object-store state only: local state dirs never import it
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self._client = boto3.client("s3", config=Config(retries={"max_attempts": 1}, connect_timeout=5,
                                                        read_timeout=30))
        self._versions: dict[str, str | None] = {}  # name -> the ETag last read or written; None: seen absent
        self._bodies: dict[str, bytes] = {}  # what an appended object holds, so an append need not read it

    def where(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                answer = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
            except self._client.exceptions.NoSuchKey:
                self._versions[name] = None
                return None
            body = answer["Body"].read()
            self._versions[name], self._bodies[name] = answer["ETag"], body
            return body

        return self._retried(name, "read", get)

    def create(self, name: str, data: bytes) -> None:
        self._put(name, data, {"IfNoneMatch": "*"}, on_refused=AlreadyExists(f"{self.where(name)}: exists already"))

    def replace(self, name: str, data: bytes) -> None:
        if name not in self._versions:
            raise RuntimeError(f"{self.where(name)}: replaced before it was read; a conditional write needs its version")
        version = self._versions[name]
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        self._put(name, data, condition, on_refused=Superseded(
            f"{self.where(name)}: another process wrote it since this one read it; this process no longer owns the "
            "state and stops (nothing it wrote was lost: the write was refused)"))

    def append(self, name: str, line: bytes) -> None:
        if name not in self._bodies and self._versions.get(name, "") is not None:
            raise RuntimeError(f"{self.where(name)}: appended before it was read")
        self.replace(name, self._bodies.get(name, b"") + line)

    def _put(self, name: str, data: bytes, condition: dict, on_refused: StateError) -> None:
        sent = [0]

        def put() -> None:
            sent[0] += 1
            try:
                answer = self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, **condition)
            except self._client.exceptions.ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 412: the condition failed. 409 ConditionalRequestConflict: a concurrent conditional write
                # to the same key won. Either way another writer was there first.
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    if sent[0] > 1 and self._holds(name, data):
                        return  # our own earlier attempt landed and only its answer was lost
                    raise on_refused from None
                raise
            self._versions[name], self._bodies[name] = answer["ETag"], data

        self._retried(name, "write", put)

    def _holds(self, name: str, data: bytes) -> bool:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        except Exception:
            return False
        body = answer["Body"].read()
        if body != data:
            return False
        self._versions[name], self._bodies[name] = answer["ETag"], body
        return True

    def _retried(self, name: str, action: str, call: Callable[[], T]) -> T:
        """`call`, tried again on a failure on the way (connection, timeout, 5xx); StateError naming the
        object when it keeps failing or is refused for good (no bucket, no permission)."""
        from botocore.exceptions import BotoCoreError, ClientError

        delay = RETRY_BACKOFF_S
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return call()
            except StateError:
                raise
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                if status < 500 or attempt == WRITE_ATTEMPTS - 1:
                    raise StateError(f"{self.where(name)}: cannot {action} it ({e}); check the bucket exists and "
                                     "this process's credentials may read and write the prefix") from None
            except BotoCoreError as e:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise StateError(f"{self.where(name)}: cannot {action} it ({e}); check the store's endpoint "
                                     "(AWS_ENDPOINT_URL) answers") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")
