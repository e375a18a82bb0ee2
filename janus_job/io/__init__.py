"""The one entry to remote storage: every read, download and filesystem of a job goes through here.

A location is a local path, a ``file://`` URL or any fsspec URL (``s3://``, ``gs://``, ``memory://``,
...). ``endpoint_url`` (the spec's ``features.endpoint_url``: MinIO, Ceph, R2, ...) applies to every
``s3://`` location, whatever reads it: annotations, frames, model and VGGT weights, checkpoints and
the feature store. Credentials come from the usual AWS_* variables or the pod's identity;
``require_s3_credentials`` resolves them up front so a missing Secret is a clear error.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from janus_job.errors import JobError

MODEL_CACHE_ENV = "JANUS_MODEL_CACHE"
S3_SCHEMES = ("s3", "s3a")


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URL other than ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    """The filesystem path of a local path or ``file://`` URL."""
    return str(location).removeprefix("file://")


def storage_options(location: str | os.PathLike, endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for ``location``: the endpoint for ``s3://``, nothing otherwise."""
    scheme = str(location).split("://", 1)[0] if "://" in str(location) else ""
    if endpoint_url and scheme in S3_SCHEMES:
        return {"client_kwargs": {"endpoint_url": endpoint_url}}
    return {}


def url_to_fs(location: str | os.PathLike, endpoint_url: str | None = None, **options: Any) -> tuple[Any, str]:
    """``(filesystem, path)`` of a location; ``options`` go to the filesystem (after the endpoint's)."""
    import fsspec

    merged = {**storage_options(location, endpoint_url), **options}
    return fsspec.core.url_to_fs(str(location), **merged)


def read_bytes(location: str | os.PathLike, endpoint_url: str | None = None) -> bytes:
    """Bytes of a local path or an fsspec URL; a missing file is FileNotFoundError, transport errors OSError."""
    if not is_remote(location):
        with open(local_path(location), "rb") as handle:
            return handle.read()
    import fsspec

    try:
        with fsspec.open(str(location), "rb", **storage_options(location, endpoint_url)) as handle:
            return handle.read()
    except FileNotFoundError:
        raise
    except Exception as err:  # transport errors of any fsspec backend
        raise OSError(f"{type(err).__name__}: {err}") from err


def fetch_file(url: str, target: str | os.PathLike, endpoint_url: str | None = None, *, what: str = "file") -> None:
    """Copies one remote file to ``target`` in 64 MiB chunks; a missing or unreachable file is a JobError."""
    import fsspec

    try:
        with fsspec.open(url, "rb", **storage_options(url, endpoint_url)) as src, open(target, "wb") as dst:
            while chunk := src.read(64 << 20):
                dst.write(chunk)
    except FileNotFoundError as err:
        raise JobError(f"{what} {url} does not exist") from err
    except Exception as err:  # fsspec backends raise many types
        raise JobError(f"{what} {url} could not be fetched ({err}); check the URL, endpoint and credentials") from err


def local_copy(location: str, cache_dir: str | None = None, endpoint_url: str | None = None) -> str:
    """A local directory for a model directory given as a path or an fsspec URL (downloaded once).

    Downloads go to ``cache_dir`` (default ``$JANUS_MODEL_CACHE`` or ``~/.cache/janus-train/models``)
    under a per-process partial name, renamed into place when complete, so concurrent ranks never
    see half a directory.
    """
    if not is_remote(location):
        local = local_path(location)
        if not os.path.isdir(local):
            raise JobError(f"model path {local} is not a directory: point it at the Qwen2.5-VL "
                           "checkpoint directory or an fsspec URL of one")
        return local
    root = cache_dir or os.environ.get(MODEL_CACHE_ENV, os.path.expanduser("~/.cache/janus-train/models"))
    target = os.path.join(root, str(location).split("://", 1)[1].strip("/").replace("/", "__"))
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    partial = target + f".partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        fs, path = url_to_fs(location, endpoint_url)
        fs.get(path.rstrip("/") + "/", partial + "/", recursive=True)
    except Exception as err:  # fsspec backends raise many types
        shutil.rmtree(partial, ignore_errors=True)
        raise JobError(f"cannot download model from {location}: {err}") from err
    open(os.path.join(partial, ".complete"), "w").close()
    try:
        os.replace(partial, target)
    except OSError:  # another process renamed its copy first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def require_s3_credentials(url: str, what: str = "features.store") -> None:
    """Resolves credentials up front so a missing Secret is a clear error, not a late 403 or a hang."""
    import botocore.session

    session = botocore.session.get_session()
    session.set_config_variable("metadata_service_timeout", 1)
    session.set_config_variable("metadata_service_num_attempts", 1)
    try:
        credentials = session.get_credentials()
    except Exception as err:  # a broken profile or token file
        raise JobError(f"cannot load S3 credentials for {url}: {err}") from err
    if credentials is None:
        raise JobError(
            f"no S3 credentials for {what} {url}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (the chart sets them from the Secret named by "
            "features.credentials_secret)"
        )


def s3_filesystem(endpoint_url: str | None, *, connect_timeout_s: float, read_timeout_s: float,
                  max_attempts: int) -> Any:
    """An uncached s3fs filesystem with bounded timeouts and botocore's retries (no s3fs multiplier)."""
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint_url,
        skip_instance_cache=True,
        use_listings_cache=False,
        config_kwargs={
            "connect_timeout": connect_timeout_s,
            "read_timeout": read_timeout_s,
            "retries": {"max_attempts": max_attempts, "mode": "standard"},
        },
    )
    fs.retries = 1  # botocore already retries (max_attempts); s3fs would multiply it by 5
    return fs
