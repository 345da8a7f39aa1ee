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
(S3's `If-Match: <etag>`, or `If-None-Match: *` for one it saw absent; GCS's `ifGenerationMatch`). A process that is no longer the
owner can therefore never overwrite what the new owner wrote: its write is refused (`Superseded`), which
is never retried into a second writer, and the service stops. An append on an object store is a
conditional replace of the whole log (logs are kilobytes to a few megabytes). S3, MinIO and GCS honour the
conditions; so do the tests' emulators, moto's server (both headers on PutObject) and fake-gcs-server.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
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
    """The store of `--state-dir`: a local folder (created when owned) or `s3://` / `gs://bucket/prefix`."""
    if not is_uri(state_dir):
        return LocalStore(Path(state_dir))
    location = parse_location(state_dir)
    bucket, _, prefix = location.path.partition("/")
    return (S3Store if location.scheme == "s3" else GCSStore)(bucket, prefix.strip("/"))


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


class Refused(Exception):
    """A backend's conditional write refused (S3 412/409, GCS 412): another writer was there first."""


class ConditionalStore(ABC):
    """An object-store state: every write conditional on the version this process last read or wrote of
    that object (see the module doc). A backend gives `_get`, `_put` and `_passing`; versions are opaque
    (an S3 ETag, a GCS generation)."""

    uri: str

    def __init__(self, uri: str, prefix: str):
        self.uri, self.prefix = uri.rstrip("/"), prefix
        self._versions: dict[str, str | None] = {}  # name -> the version last read or written; None: seen absent
        self._bodies: dict[str, bytes] = {}  # what an object holds, so an append need not read it again

    def where(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> bytes | None:
        found = self._retried(name, "read", lambda: self._get(self._key(name)))
        self._versions[name] = found[1] if found else None
        if found:
            self._bodies[name] = found[0]
        return found[0] if found else None

    def create(self, name: str, data: bytes) -> None:
        self._write(name, data, None, AlreadyExists(f"{self.where(name)}: exists already"))

    def replace(self, name: str, data: bytes) -> None:
        if name not in self._versions:
            raise RuntimeError(f"{self.where(name)}: replaced before it was read; a conditional write needs its version")
        self._write(name, data, self._versions[name], Superseded(
            f"{self.where(name)}: another process wrote it since this one read it; this process no longer owns the "
            "state and stops (nothing it wrote was lost: the write was refused)"))

    def append(self, name: str, line: bytes) -> None:
        if name not in self._bodies and self._versions.get(name, "") is not None:
            raise RuntimeError(f"{self.where(name)}: appended before it was read")
        self.replace(name, self._bodies.get(name, b"") + line)

    def _write(self, name: str, data: bytes, version: str | None, refused: StateError) -> None:
        """Write `data` if the object is at `version` (None: absent); `refused` when it is not. A refusal
        after a failed attempt may be that attempt's own write, landed with its answer lost: read back, and
        the same bytes there mean it landed (the bytes of a state write name their writer and time)."""
        attempts = [0]

        def put() -> str:
            attempts[0] += 1
            try:
                return self._put(self._key(name), data, version)
            except Refused:
                if attempts[0] > 1:
                    found = self._get(self._key(name))
                    if found is not None and found[0] == data:
                        return found[1]
                raise refused from None

        self._versions[name] = self._retried(name, "write", put)
        self._bodies[name] = data

    def _retried(self, name: str, action: str, call: Callable[[], T]) -> T:
        """`call`, tried again on a failure on the way (`_passing`); StateError naming the object when it
        keeps failing or is refused for good (no bucket, no permission)."""
        attempt = 0
        while True:
            try:
                return call()
            except StateError:
                raise
            except Exception as e:
                passing = self._passing(e)
                if passing is None:
                    raise  # not the store's: a bug keeps its traceback
                attempt += 1
                if not passing or attempt == WRITE_ATTEMPTS:
                    fix = ("check the store's endpoint answers" if passing else
                           "check the bucket exists and this process's credentials may read and write the prefix")
                    raise StateError(f"{self.where(name)}: cannot {action} it ({e}); {fix}") from None
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))

    # --- what a backend gives -------------------------------------------------------------------------

    @abstractmethod
    def _get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and version; None when it does not exist."""

    @abstractmethod
    def _put(self, key: str, data: bytes, version: str | None) -> str:
        """Write if the object is at `version` (None: absent); its new version, or Refused."""

    @abstractmethod
    def _passing(self, error: Exception) -> bool | None:
        """Whether the client's `error` may pass if tried again (a connection, a timeout, a 5xx: True), is
        final (no bucket, no permission: False), or is not the store's at all (None)."""


class S3Store(ConditionalStore):
    """A state under `s3://bucket/prefix/` (S3, MinIO, any S3-compatible store): `If-None-Match: *` and
    `If-Match: <ETag>`. The endpoint and credentials come from the environment as for datasets
    (pipeline/storage.py): `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, the usual credential chain."""

    def __init__(self, bucket: str, prefix: str):
        import boto3  # only an object-store state imports its client
        from botocore.config import Config

        super().__init__(f"s3://{bucket}/{prefix}", prefix)
        self.bucket = bucket
        self._client = boto3.client("s3", config=Config(retries={"max_attempts": 1}, connect_timeout=5,
                                                        read_timeout=30))

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
        except self._client.exceptions.NoSuchKey:
            return None
        return answer["Body"].read(), answer["ETag"]

    def _put(self, key: str, data: bytes, version: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)["ETag"]
        except self._client.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the condition failed. 409 ConditionalRequestConflict: a concurrent conditional write
            # to the same key won. Either way another writer was there first.
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise Refused from None
            raise

    def _passing(self, error: Exception) -> bool | None:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError):
            return (error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
        return True if isinstance(error, BotoCoreError) else None


class GCSStore(ConditionalStore):
    """A state under `gs://bucket/prefix/`: `ifGenerationMatch` (0: absent). Credentials are the
    application default ones; `STORAGE_EMULATOR_HOST` points the client at an emulator (the tests'
    fake-gcs-server, which honours the condition)."""

    def __init__(self, bucket: str, prefix: str):
        try:
            from google.cloud import storage
        except ImportError:
            raise StateError(f"--state-dir gs://{bucket}/{prefix}: a state in GCS needs google-cloud-storage; "
                             "pip install 'replaymix[gcs]'") from None
        super().__init__(f"gs://{bucket}/{prefix}", prefix)
        project = os.environ.get("GOOGLE_CLOUD_PROJECT") or ("emulator" if os.environ.get("STORAGE_EMULATOR_HOST") else None)
        self._bucket = storage.Client(project=project).bucket(bucket)

    def _get(self, key: str) -> tuple[bytes, str] | None:
        from google.api_core.exceptions import NotFound

        blob = self._bucket.blob(key)
        try:
            data = blob.download_as_bytes(retry=None)
        except NotFound:
            return None
        return data, str(blob.generation)

    def _put(self, key: str, data: bytes, version: str | None) -> str:
        from google.api_core.exceptions import PreconditionFailed

        blob = self._bucket.blob(key)
        try:
            blob.upload_from_string(data, if_generation_match=int(version or 0), retry=None)
        except PreconditionFailed:
            raise Refused from None
        return str(blob.generation)

    def _passing(self, error: Exception) -> bool | None:
        from google.api_core.exceptions import GoogleAPICallError, ServerError
        from google.auth.exceptions import GoogleAuthError
        from requests.exceptions import RequestException

        if isinstance(error, (ServerError, RequestException)):
            return True
        return False if isinstance(error, (GoogleAPICallError, GoogleAuthError)) else None
