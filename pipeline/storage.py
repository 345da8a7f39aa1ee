"""Where a path points: the local disk or an object store (`s3://`, `gs://`), and how to reach it.

Every path flag of replaymix (`--input`, `--out`, `--dataset`) goes through `parse_location` once: a
local path stays a local path, exactly as before; `s3://bucket/key` and `gs://bucket/key` become a
`Location` on `pyarrow.fs` (already a dependency: no second S3 client to configure). `hf://` URIs are
Hugging Face Hub datasets, read through `datasets` (`pipeline/hf_inputs.py`), not files.

Credentials and endpoints come from the usual environment: for S3 `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE` and its files, a web identity or the instance's
role, the region from `AWS_REGION`/`AWS_DEFAULT_REGION`, and `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`
for an S3-compatible store (MinIO, Ceph, R2, moto); for GCS the application default credentials.

Reads are idempotent, so each is retried (`READ_ATTEMPTS`, backing off) on a failure that may pass (a
refused or dropped connection, a timeout, a 5xx); a missing object, bucket or credential is not retried.
Every failure becomes a `StorageError` that names the object and says what to do.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

import pyarrow.fs as pafs

from pipeline.atomic_file import atomic_writer
from pipeline.errors import PipelineError

STORE_SCHEMES = ("s3", "gs")
HUB_SCHEME = "hf"
READ_ATTEMPTS = 4  # the first try and three retries
RETRY_BACKOFF_S = 0.25  # doubled after each failed attempt: 0.25 + 0.5 + 1 s at most in all
# What pyarrow's GCS client says when it finds no application default credentials.
_NO_GCS_CREDENTIALS = "Could not create a OAuth2 access token"
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")

T = TypeVar("T")


class StorageError(PipelineError):
    """An object store cannot be reached or refuses a request; the message names the object."""


class MissingObject(StorageError):
    """The object (or its bucket) does not exist."""


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (`scheme://...`) rather than a local path; the one test for it."""
    return bool(_URI.match(os.fspath(path)))


@dataclass(frozen=True)
class Location:
    """A local path (`scheme` "") or an object in a store (`path` is `bucket/key`, no leading slash)."""

    scheme: str
    path: str

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def uri(self) -> str:
        """What a user would type: the local path, or `s3://bucket/key`."""
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return Location(self.scheme, self.path.rstrip("/").rsplit("/", 1)[0])

    def child(self, *names: str) -> "Location":
        return Location(self.scheme, "/".join([self.path.rstrip("/"), *names]))

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    def __str__(self) -> str:
        return self.uri


def parse_location(text: str | os.PathLike) -> Location:
    """A path or a URI, parsed once. Local paths are made absolute; `s3://`/`gs://` need a bucket."""
    text = os.fspath(text)
    match = _URI.match(text)
    if not match:
        return Location("", str(Path(text).absolute()))
    scheme, rest = match.group(1).lower(), match.group(2).strip("/")
    if scheme == "gcs":
        scheme = "gs"
    if scheme == "file":
        return Location("", str(Path("/" + rest)))
    if scheme not in STORE_SCHEMES:
        raise StorageError(
            f"{text}: unsupported scheme {scheme!r}; use a local path, s3://BUCKET/KEY, gs://BUCKET/KEY "
            "(or hf://datasets/ORG/NAME as an --input)"
        )
    if not rest:
        raise StorageError(f"{text}: no bucket; write {scheme}://BUCKET/KEY")
    return Location(scheme, rest)


# --- the filesystem --------------------------------------------------------------------------------

_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}


def _s3_settings() -> tuple:
    """What an S3 client depends on in the environment; a change (a test, a new session) makes a new one."""
    names = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return tuple(os.environ.get(name) for name in names)


def _has_s3_credentials() -> bool:
    """Whether any source of the AWS credential chain is configured, the instance's role aside."""
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"):
        return True
    if os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") \
            or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return True
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    return any(Path(f).expanduser().is_file() for f in files)


def filesystem(location: Location) -> pafs.FileSystem:
    """The pyarrow filesystem of a store location, made once per scheme and environment."""
    if location.scheme == "s3":
        key = ("s3", *_s3_settings())
        if key not in _FILESYSTEMS:
            # Without any configured source the chain's last resort is the machine's instance role; where
            # that is switched off too, say so now instead of sending unsigned requests.
            if not _has_s3_credentials() and os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
                raise StorageError(
                    f"{location.uri}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                    "AWS_PROFILE, or a credentials file) for this bucket"
                )
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            options: dict = {}
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                options.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                options["region"] = region
            # Our own loop retries reads (bounded, and it names the object); the client does not, so that
            # a dead store is reported in seconds rather than after nested retries.
            _FILESYSTEMS[key] = pafs.S3FileSystem(
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1), connect_timeout=5,
                request_timeout=60, **options)
        return _FILESYSTEMS[key]
    if location.scheme == "gs":
        key = ("gs", os.environ.get("STORAGE_EMULATOR_HOST"))
        if key not in _FILESYSTEMS:
            try:
                host = os.environ.get("STORAGE_EMULATOR_HOST")
                # An emulator takes no credentials: without `anonymous` the client first looks for the
                # application default ones (a metadata server), retrying for minutes where there is none.
                # As for S3, our own loop retries, so the client gives up soon: without a limit it retries
                # a missing credential (no metadata server to ask) for many minutes before it says so.
                _FILESYSTEMS[key] = pafs.GcsFileSystem(
                    retry_time_limit=timedelta(seconds=5),
                    **({"endpoint_override": host.split("://")[-1], "scheme": "http", "anonymous": True}
                       if host else {}))
            except (ImportError, NotImplementedError, OSError) as e:  # a pyarrow built without GCS
                raise StorageError(f"{location.uri}: this pyarrow build has no GCS support ({e})") from e
        return _FILESYSTEMS[key]
    raise ValueError(f"{location.uri} is not in an object store")


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"


def _explain(location: Location, error: BaseException, action: str) -> StorageError:
    """A StorageError naming the object, what went wrong and what to do."""
    text = str(error)
    if isinstance(error, FileNotFoundError) or "NOT_FOUND" in text or "NoSuchKey" in text:
        bucket = location.path.split("/", 1)[0]
        try:
            bucket_found = filesystem(location).get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError:
            bucket_found = True
        if not bucket_found:
            return MissingObject(f"{location.uri}: the bucket {bucket!r} does not exist (or these credentials cannot "
                                "see it); check the URI and AWS_ENDPOINT_URL / the account")
        return MissingObject(f"{location.uri}: no such object; check the path")
    if _NO_GCS_CREDENTIALS in text:
        return StorageError(f"{location.uri}: no Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS to a "
                            "service account's key file, or run `gcloud auth application-default login`")
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text or "403" in text:
        return StorageError(f"{location.uri}: access denied while trying to {action}; check the credentials "
                            "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's policy")
    return StorageError(f"{location.uri}: could not {action} at {_endpoint()} ({text.strip().splitlines()[0]}); "
                        "check that the store is reachable (AWS_ENDPOINT_URL, network) and retry")


def _is_permanent(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, (FileNotFoundError, PermissionError)) or any(
        word in text for word in ("NOT_FOUND", "NoSuchKey", "NoSuchBucket", "ACCESS_DENIED", "AccessDenied",
                                  "InvalidAccessKeyId", _NO_GCS_CREDENTIALS))


def with_retries(location: Location, action: str, call: Callable[[], T], attempts: int = READ_ATTEMPTS) -> T:
    """`call()`, retried with back-off while it fails in a way that may pass; a StorageError at the end.

    Only for idempotent requests (reads, listings, whole-object writes and deletes)."""
    delay = RETRY_BACKOFF_S
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except StorageError:
            raise
        except OSError as e:
            if _is_permanent(e):
                raise _explain(location, e, action) from e
            if attempt == attempts:
                error = _explain(location, e, action)
                raise StorageError(f"{error.message} (gave up after {attempts} attempts)") from e
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# --- operations: each takes a Location, local or in a store ----------------------------------------


def read_range(location: Location, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a file or object; short only at its end."""
    if location.is_local:
        with open(location.path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    fs = filesystem(location)

    def read() -> bytes:
        with fs.open_input_file(location.path) as f:
            return f.read_at(length, offset)

    return with_retries(location, "read it", read)


def read_bytes(location: Location) -> bytes:
    if location.is_local:
        return location.local_path.read_bytes()
    fs = filesystem(location)

    def read() -> bytes:
        with fs.open_input_file(location.path) as f:
            return f.read()

    return with_retries(location, "read it", read)


def open_input(path: str | Location, buffer_bytes: int = 1 << 20) -> BinaryIO:
    """A readable, seekable, buffered binary file (read, seek, tell, readline) for a path or an object."""
    location = path if isinstance(path, Location) else parse_location(path)
    if location.is_local:
        return open(location.path, "rb")
    fs = filesystem(location)
    native = with_retries(location, "open it", lambda: fs.open_input_file(location.path))
    return io.BufferedReader(native, buffer_size=buffer_bytes)


# What a worker process needs of this process's environment to reach the same stores the same way.
STORE_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED",
                     "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST",
                     "HF_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE")


def store_environment() -> dict[str, str]:
    """The store settings of this process's environment, for Ray tasks that read objects: a Ray
    started earlier, or a cluster's workers, do not see variables this process set since."""
    return {name: os.environ[name] for name in STORE_ENVIRONMENT if name in os.environ}


def file_size(location: Location) -> int | None:
    """The size of a file or object, or None when there is none."""
    if location.is_local:
        path = location.local_path
        return path.stat().st_size if path.is_file() else None
    info = with_retries(location, "look it up", lambda: filesystem(location).get_file_info(location.path))
    return info.size if info.type == pafs.FileType.File else None


def list_files(location: Location) -> dict[str, int]:
    """Every object under a prefix (or file under a folder), recursively: {path relative to it: size}."""
    if location.is_local:
        root = location.local_path
        if not root.is_dir():
            return {}
        return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    fs = filesystem(location)
    selector = pafs.FileSelector(location.path.rstrip("/"), recursive=True, allow_not_found=True)
    infos = with_retries(location, "list it", lambda: fs.get_file_info(selector))
    prefix = location.path.rstrip("/") + "/"
    return {info.path[len(prefix):]: info.size for info in sorted(infos, key=lambda i: i.path)
            if info.type == pafs.FileType.File and info.path.startswith(prefix)}


def glob_files(pattern: Location) -> dict[str, int]:
    """Objects whose path matches a glob (`*`, `?`, `[...]`; `**` crosses folders): {uri: size}, sorted."""
    parts = pattern.path.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = Location(pattern.scheme, "/".join(parts[:fixed]))
    regex = _glob_regex(pattern.path)
    return {base.child(rel).uri: size for rel, size in list_files(base).items()
            if regex.match(base.child(rel).path)}


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex: `*` and `?` stay within a folder, `**/` matches any number of folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            out.append(fnmatch.translate(pattern[i:end + 1])[4:-3])  # fnmatch's own class syntax
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def write_bytes(location: Location, data: bytes) -> None:
    """Put a whole object (a store's put is atomic: readers see the old object or the new one)."""
    fs = filesystem(location)

    def put() -> None:
        with fs.open_output_stream(location.path) as f:
            f.write(data)

    with_retries(location, "write it", put)


def upload_file(source: Path, location: Location, chunk_bytes: int = 8 << 20) -> None:
    """Copy a local file to an object, streamed (multipart for a large one)."""
    fs = filesystem(location)

    def put() -> None:
        with open(source, "rb") as f, fs.open_output_stream(location.path) as out:
            while chunk := f.read(chunk_bytes):
                out.write(chunk)

    with_retries(location, "write it", put)


def download_file(location: Location, target: Path, chunk_bytes: int = 8 << 20) -> None:
    """Copy an object to a local file, streamed; the file is replaced atomically (never half there)."""
    fs = filesystem(location)

    def get() -> None:
        with fs.open_input_stream(location.path) as source, atomic_writer(target) as out:
            while chunk := source.read(chunk_bytes):
                out.write(chunk)

    with_retries(location, "read it", get)


def delete_file(location: Location) -> None:
    fs = filesystem(location)

    def delete() -> None:
        try:
            fs.delete_file(location.path)
        except FileNotFoundError:
            pass

    with_retries(location, "delete it", delete)
