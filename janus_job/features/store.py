"""Feature store over fsspec: content keys, fingerprint manifests, atomic checked objects, local cache.

Layout under the store root (``s3://bucket/prefix``, ``file:///path`` or a plain path)::

    manifest-spatial.json            fingerprint of the spatial function (refused if it differs)
    manifest-vision.json             fingerprint of the vision-tower function
    spatial/ab/<64 hex>.jnsf         one object per distinct ordered frame sequence
    vision/ab/<64 hex>.jnsf          one object per distinct frame content
    frames/<annotations>/<shard>.json   annotation image string -> frame content hash
    markers/<annotations>/shard-*.json  one per finished precompute worker
    markers/<annotations>/COMPLETE.json the final marker the trainer waits on
    quarantine/<object key>.json        a corrupt object met in training (never read again)

Every JSON record (manifests, frame index shards, markers) carries the sha256 of its canonical
form; an index shard also names the fingerprint ids and annotation digest it was built for, and
the COMPLETE marker holds the checksum of every index shard, so an index edited after precompute
(even rewritten consistently) is refused with the object named.

Keys are content-derived (docs/features.md): a frame is identified by the sha256 of its file
bytes; a spatial key hashes the fingerprint id with the ordered frame hashes, a vision key the
fingerprint id with one frame hash. Changing an image, the frame order, the weights or the
geometry therefore changes the key; nothing stale can be served under a current key.

Objects are ``MAGIC | u32 header length | JSON header | raw tensor bytes``; the header carries
dtype, shape, byte count and the payload's sha256, verified on every read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from janus_job.errors import BadSample, JobError
from janus_job.io import require_s3_credentials, s3_filesystem

if TYPE_CHECKING:
    import torch

    from janus_job.data.annotations import Sample

MAGIC = b"JNSF1\n"
OBJECT_SUFFIX = ".jnsf"
KINDS = ("spatial", "vision")
QUARANTINE = "quarantine"
_TMP_MARK = ".tmp."
_STALE_TMP_S = 3600.0
_DTYPES = ("bfloat16", "float16", "float32", "float64", "int64", "int32", "uint8")


# ---------------------------------------------------------------- hashing and keys


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash of a file (a frame's identity)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    except OSError as err:
        raise JobError(f"cannot read frame {path}: {err.strerror or err}") from err
    return digest.hexdigest()


def state_dict_digest(state_dict: Mapping[str, Any]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order.

    Independent of the checkpoint's file format (model.pt vs model.safetensors), sensitive to
    every weight bit and to the dtype the weights are held in.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}\n".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """Everything the cached function depends on besides its input frames.

    ``fields`` holds e.g. weights digest, preprocessing geometry, layer, dtype and the code
    version of the function. Two stores agree only if every field agrees.
    """

    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise JobError(f"fingerprint kind must be one of {KINDS}, got {self.kind!r}")

    def canonical(self) -> str:
        return json.dumps({"kind": self.kind, "fields": dict(self.fields)}, sort_keys=True)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:32]

    def differences(self, other: Fingerprint) -> list[str]:
        names = sorted(set(self.fields) | set(other.fields))
        return [
            f"{name}: store has {other.fields.get(name)!r}, this job has {self.fields.get(name)!r}"
            for name in names
            if self.fields.get(name) != other.fields.get(name)
        ]


def spatial_key(fingerprint_id: str, frame_hashes: Iterable[str]) -> str:
    hashes = list(frame_hashes)
    if not hashes:
        raise JobError("a spatial key needs at least one frame")
    text = "spatial\n" + fingerprint_id + "\n" + "\n".join(hashes)
    return _object_key("spatial", hashlib.sha256(text.encode()).hexdigest())


def vision_key(fingerprint_id: str, frame_hash: str) -> str:
    text = "vision\n" + fingerprint_id + "\n" + frame_hash
    return _object_key("vision", hashlib.sha256(text.encode()).hexdigest())


def _object_key(kind: str, digest: str) -> str:
    return f"{kind}/{digest[:2]}/{digest}{OBJECT_SUFFIX}"


# ---------------------------------------------------------------- records

RECORD_CHECKSUM = "sha256"


def record_checksum(record: Mapping[str, Any]) -> str:
    """sha256 of a JSON record's canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(record: Mapping[str, Any]) -> dict:
    """The record with its checksum added (FeatureStore.read_record verifies it)."""
    body = {name: value for name, value in record.items() if name != RECORD_CHECKSUM}
    return {**body, RECORD_CHECKSUM: record_checksum(body)}


# ---------------------------------------------------------------- serialisation


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """Header + raw bytes; decode_tensor returns a bit-identical tensor."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise JobError(f"cannot store a tensor of dtype {dtype}; supported: {_DTYPES}")
    payload = _tensor_bytes(tensor)
    header = json.dumps(
        {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "nbytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        },
        sort_keys=True,
    ).encode()
    return MAGIC + len(header).to_bytes(4, "little") + header + payload


class CorruptObject(JobError):
    """A stored object that fails its own checks (magic, header, size, checksum)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def decode_tensor(blob: bytes, key: str) -> torch.Tensor:
    """Parses and verifies an object; any damage raises CorruptObject (a JobError) naming the key."""
    import torch

    def corrupt(why: str) -> JobError:
        return CorruptObject(
            f"feature object {key} is corrupt ({why}); delete it and rerun "
            "`janus-job precompute` (it recomputes only what is missing)",
            key,
        )

    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise corrupt("bad magic")
    start = len(MAGIC) + 4
    header_len = int.from_bytes(blob[len(MAGIC) : start], "little")
    try:
        header = json.loads(blob[start : start + header_len])
        dtype = getattr(torch, header["dtype"])
        shape = [int(n) for n in header["shape"]]
        nbytes, checksum = int(header["nbytes"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise corrupt(f"unreadable header: {err}") from err
    payload = memoryview(blob)[start + header_len :]
    if len(payload) != nbytes:
        raise corrupt(f"payload is {len(payload)} bytes, header says {nbytes}")
    if hashlib.sha256(payload).hexdigest() != checksum:
        raise corrupt("checksum mismatch")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


# ---------------------------------------------------------------- local cache


class LocalCache:
    """Node-local, size-limited LRU cache of verified objects, shared by processes on one node.

    Fill is temp file + os.replace (atomic); hits refresh the file's mtime; eviction removes the
    least recently used files until the total is under the limit. Lock-free: concurrent fills of
    one key write identical bytes, and an evicted file still open by a reader stays readable.
    """

    def __init__(self, root: str | os.PathLike, size_limit_bytes: int) -> None:
        self.root = Path(root)
        self.limit = int(size_limit_bytes)
        self._since_scan = 0
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise JobError(f"features.cache_dir {self.root} is not writable: {err}") from err

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return blob

    def put(self, key: str, blob: bytes) -> None:
        if self.limit <= 0 or len(blob) > self.limit:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{_TMP_MARK}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as handle:
            handle.write(blob)
        os.replace(tmp, path)
        with self._lock:
            self._since_scan += len(blob)
            due = self._since_scan > max(self.limit // 20, 1)
            if due:
                self._since_scan = 0
        if due:
            self.evict()

    def discard(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def entries(self) -> list[tuple[float, int, Path]]:
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = Path(dirpath) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if _TMP_MARK in name:
                    if time.time() - stat.st_mtime > _STALE_TMP_S:
                        path.unlink(missing_ok=True)
                    continue
                found.append((stat.st_mtime, stat.st_size, path))
        return found

    def size(self) -> int:
        return sum(size for _t, size, _p in self.entries())

    def evict(self) -> None:
        entries = sorted(self.entries())
        total = sum(size for _t, size, _p in entries)
        for _mtime, size, path in entries:
            if total <= self.limit:
                break
            path.unlink(missing_ok=True)
            total -= size


# ---------------------------------------------------------------- the store


@dataclass
class StoreReport:
    objects: dict[str, int]
    bytes: dict[str, int]
    corrupt: list[str]
    stale_temp: list[str]
    manifests: dict[str, dict | None]


class FeatureStore:
    """A feature store at ``url``; create one per process (it re-opens its connection after fork)."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_size_gib: float = 0.0,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if not url:
            raise JobError("features.store is empty: give an s3://bucket/prefix, file:///path or a path")
        _refuse_url_credentials("features.endpoint_url", endpoint_url)
        self.url = url
        self.endpoint_url = endpoint_url or None
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max_attempts
        self.protocol, self.root = _split_url(url)
        self.cache = (
            LocalCache(cache_dir, int(cache_size_gib * (1 << 30)))
            if cache_dir and cache_size_gib > 0
            else None
        )
        self._fs = None
        self._fs_pid = None
        self._fingerprints: dict[str, Fingerprint] = {}
        self._index_shard: dict[str, str] = {}  # frame -> the index shard it was read from

    @classmethod
    def from_spec(cls, spec: Any, *, local_cache: bool = True) -> FeatureStore:
        """The spec's store; ``local_cache=False`` for writers (precompute), which never re-read."""
        features = spec.features
        return cls(
            str(features.store),
            endpoint_url=getattr(features, "endpoint_url", None),
            cache_dir=getattr(features, "cache_dir", None) if local_cache else None,
            cache_size_gib=float(getattr(features, "cache_size_gib", 0) or 0) if local_cache else 0.0,
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fs"] = None
        state["_fs_pid"] = None
        return state

    # -- connection

    @property
    def fs(self):
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs = self._connect()
            self._fs_pid = os.getpid()
        return self._fs

    def _connect(self):
        if self.protocol == "file":
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem()
        if self.protocol != "s3":
            raise JobError(f"features.store {self.url!r}: only s3:// and file:// (or a path) are supported")
        require_s3_credentials(self.url)
        return s3_filesystem(self.endpoint_url, connect_timeout_s=self.connect_timeout_s,
                             read_timeout_s=self.read_timeout_s, max_attempts=self.max_attempts)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Runs one storage operation, turning transport failures into a JobError."""
        try:
            return fn()
        except (FileNotFoundError, JobError):
            raise
        except PermissionError as err:
            raise JobError(
                f"feature store {self.url} refused {what}: {err}. Check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, from features.credentials_secret)."
            ) from err
        except Exception as err:  # botocore/aiohttp/OS errors all mean the same to the user
            where = f" at endpoint {self.endpoint_url}" if self.endpoint_url else ""
            raise JobError(
                f"feature store {self.url}{where} failed during {what}: {type(err).__name__}: {err}. "
                "Check features.store, features.endpoint_url and that the bucket exists and is reachable."
            ) from err

    def check_reachable(self) -> None:
        """Fails fast (JobError) when the bucket or directory cannot be listed."""
        if self.protocol == "file":
            Path(self.root).mkdir(parents=True, exist_ok=True)
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self._call(f"listing bucket {bucket}", lambda: self.fs.ls(bucket, detail=False))
        except FileNotFoundError as err:
            raise JobError(f"bucket {bucket} of features.store {self.url} does not exist: create it first") from err

    # -- raw objects

    def put_bytes(self, key: str, blob: bytes) -> None:
        """Atomic publish: a reader sees the whole object or nothing."""
        if self.protocol == "file":
            path = Path(self._path(key))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}{_TMP_MARK}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as handle:
                    handle.write(blob)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise JobError(f"cannot write {path}: {err}") from err
            return
        # One S3 PUT (or a multipart upload) becomes visible only when complete.
        self._call(f"writing {key}", lambda: self.fs.pipe_file(self._path(key), blob))

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        # One GET: s3fs would otherwise send a HEAD first to decide on ranged parallel reads.
        options = {"max_concurrency": 1} if self.protocol == "s3" else {}
        try:
            return self._call(f"reading {key}", lambda: self.fs.cat_file(self._path(key), **options))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return bool(self._call(f"checking {key}", lambda: self.fs.exists(self._path(key))))

    def delete(self, key: str) -> None:
        try:
            self._call(f"deleting {key}", lambda: self.fs.rm_file(self._path(key)))
        except FileNotFoundError:
            pass

    def list_keys(self, prefix: str) -> list[str]:
        """Every visible key under ``prefix`` (one recursive listing; temp files excluded)."""
        base = self._path(prefix).rstrip("/")
        if self.protocol == "file" and not Path(base).exists():
            return []
        try:
            paths = self._call(f"listing {prefix}", lambda: self.fs.find(base))
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        keys = []
        for path in paths:
            key = path[len(root) :] if path.startswith(root) else path.split(root, 1)[-1]
            if _TMP_MARK not in key.rsplit("/", 1)[-1]:
                keys.append(key)
        return sorted(keys)

    def list_sizes(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix).rstrip("/")
        if self.protocol == "file" and not Path(base).exists():
            return {}
        try:
            found = self._call(f"listing {prefix}", lambda: self.fs.find(base, detail=True))
        except FileNotFoundError:
            return {}
        root = self.root.rstrip("/") + "/"
        return {
            path[len(root) :]: int(info.get("size") or 0)
            for path, info in found.items()
            if path.startswith(root) and _TMP_MARK not in path.rsplit("/", 1)[-1]
        }

    def temp_files(self) -> list[str]:
        """Leftover temp files of killed local writers (never visible as objects)."""
        if self.protocol != "file" or not Path(self.root).exists():
            return []
        return [
            str(Path(d) / name)
            for d, _dirs, files in os.walk(self.root)
            for name in files
            if _TMP_MARK in name
        ]

    def clean_temp_files(self, *, min_age_s: float = _STALE_TMP_S) -> int:
        """Removes temp files of dead local writers: ours (same host, pid gone) or older than min_age_s."""
        removed = 0
        host = socket.gethostname()
        for path in self.temp_files():
            name = Path(path).name
            try:
                _, _, rest = name.partition(_TMP_MARK)
                tmp_host, pid, _ = rest.rsplit(".", 2)
                dead = tmp_host == host and not _pid_alive(int(pid))
                old = time.time() - os.stat(path).st_mtime > min_age_s
            except (ValueError, FileNotFoundError):
                continue
            if dead or old:
                Path(path).unlink(missing_ok=True)
                removed += 1
        return removed

    # -- tensors

    def put_tensor(self, key: str, tensor: torch.Tensor) -> int:
        blob = encode_tensor(tensor)
        self.put_bytes(key, blob)
        if self.cache is not None:
            self.cache.put(key, blob)
        return len(blob)

    def get_tensor(self, key: str) -> torch.Tensor | None:
        """The verified tensor, or None if absent. Corruption raises JobError naming the key."""
        if self.cache is not None:
            blob = self.cache.get(key)
            if blob is not None:
                try:
                    return decode_tensor(blob, key)
                except JobError:
                    self.cache.discard(key)  # a damaged local copy: fall back to the store
        blob = self.get_bytes(key)
        if blob is None:
            return None
        try:
            tensor = decode_tensor(blob, f"{self.url}/{key}")
        except CorruptObject as err:
            err.key = key
            raise
        if self.cache is not None:
            self.cache.put(key, blob)
        return tensor

    def check_objects(self, keys: Iterable[str], threads: int = 8) -> list[str]:
        """Reads every key and checks it (magic, header, size, checksum); returns the corrupt ones."""
        from concurrent.futures import ThreadPoolExecutor

        def bad(key: str) -> bool:
            try:
                decode_tensor(self.get_bytes(key) or b"", key)
            except CorruptObject:
                return True
            return False

        keys = sorted(keys)
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="verify") as pool:
            return [key for key, corrupt in zip(keys, pool.map(bad, keys)) if corrupt]

    # -- quarantine: corrupt objects met in training, never read again until recomputed

    def quarantine(self, key: str, reason: str) -> None:
        """Records a corrupt object so that no run reads it again (precompute recomputes it)."""
        self.write_record(f"{QUARANTINE}/{key}.json", {"key": key, "reason": reason, "time": time.time(),
                                                       "host": socket.gethostname()})

    def quarantined(self) -> set[str]:
        """Keys of every quarantined object (one listing)."""
        prefix, suffix = f"{QUARANTINE}/", ".json"
        return {key[len(prefix):-len(suffix)] for key in self.list_keys(QUARANTINE) if key.endswith(suffix)}

    def release(self, key: str) -> None:
        """Ends a quarantine (the object was recomputed)."""
        self.delete(f"{QUARANTINE}/{key}.json")

    # -- manifests (fingerprints)

    def open(self, fingerprints: Iterable[Fingerprint], *, create: bool) -> None:
        """Checks (or, with create, writes) each kind's manifest. A different fingerprint is refused."""
        for fingerprint in fingerprints:
            key = f"manifest-{fingerprint.kind}.json"
            found = self.get_bytes(key)
            if found is None:
                if not create:
                    raise JobError(
                        f"feature store {self.url} has no {fingerprint.kind} features ({key} missing): "
                        "run `janus-job precompute --spec ...` first, or set features.mode: read_through"
                    )
                record = seal({"format": 1, "kind": fingerprint.kind, "id": fingerprint.id,
                               "fields": dict(fingerprint.fields)})
                self.put_bytes(key, json.dumps(record, sort_keys=True, indent=1).encode())
                found = self.get_bytes(key)  # re-read: a concurrent creator with other settings loses here
            self._check_manifest(fingerprint, found, key)
            self._fingerprints[fingerprint.kind] = fingerprint

    def _check_manifest(self, fingerprint: Fingerprint, blob: bytes | None, key: str) -> None:
        try:
            record = json.loads(blob or b"")
            stored = Fingerprint(record["kind"], record["fields"])
        except (ValueError, KeyError, TypeError) as err:
            raise JobError(f"{self.url}/{key} is not a valid manifest: {err}") from err
        if RECORD_CHECKSUM in record:  # manifests of the first format had none; their id is checked below
            self._unseal(key, record)
        if stored.id != fingerprint.id:
            diffs = "; ".join(fingerprint.differences(stored)) or "fingerprint ids differ"
            raise JobError(
                f"feature store {self.url} was built with a different {fingerprint.kind} function "
                f"({diffs}). Refusing to reuse it: point features.store at a new prefix, or "
                "rebuild this one with the current weights and geometry."
            )

    def manifest(self, kind: str) -> dict | None:
        blob = self.get_bytes(f"manifest-{kind}.json")
        return json.loads(blob) if blob else None

    def fingerprint(self, kind: str) -> Fingerprint:
        if kind not in self._fingerprints:
            raise JobError(f"the {kind} manifest of {self.url} was not opened; call FeatureStore.open first")
        return self._fingerprints[kind]

    def spatial_key(self, frame_hashes: Iterable[str]) -> str:
        return spatial_key(self.fingerprint("spatial").id, frame_hashes)

    def vision_key(self, frame_hash: str) -> str:
        return vision_key(self.fingerprint("vision").id, frame_hash)

    # -- frame index, markers, completion

    def write_json(self, key: str, record: Any) -> None:
        self.put_bytes(key, json.dumps(record, sort_keys=True).encode())

    def read_json(self, key: str) -> Any | None:
        blob = self.get_bytes(key)
        if blob is None:
            return None
        try:
            return json.loads(blob)
        except ValueError as err:
            raise JobError(f"{self.url}/{key} is not valid JSON ({err}); delete it and rerun precompute") from err

    def write_record(self, key: str, record: Mapping[str, Any]) -> str:
        """Writes a JSON record sealed with its checksum; returns the checksum."""
        sealed = seal(record)
        self.write_json(key, sealed)
        return sealed[RECORD_CHECKSUM]

    def read_record(self, key: str) -> dict | None:
        """A record written by write_record, its checksum verified (None when absent)."""
        record = self.read_json(key)
        return None if record is None else self._unseal(key, record)

    def _unseal(self, key: str, record: Any) -> dict:
        if not isinstance(record, dict) or RECORD_CHECKSUM not in record:
            raise JobError(
                f"{self.url}/{key} carries no checksum (written by an older janus-train, or by hand): rerun "
                "`janus-job precompute` (it rewrites the index and markers and recomputes only missing features)"
            )
        body = {name: value for name, value in record.items() if name != RECORD_CHECKSUM}
        if record_checksum(body) != record[RECORD_CHECKSUM]:
            raise JobError(
                f"{self.url}/{key} does not match its checksum: it was changed after precompute wrote it. "
                "Refusing to train on it: delete it and rerun `janus-job precompute`"
            )
        return body

    def write_frame_index(self, annotations_digest: str, shard: str, frames: Mapping[str, str]) -> str:
        """One worker's part of the frame index, tied to the opened fingerprints; returns its checksum."""
        record = {
            "format": 2,
            "annotations_digest": annotations_digest,
            "fingerprints": {kind: fp.id for kind, fp in sorted(self._fingerprints.items())},
            "frames": dict(frames),
        }
        return self.write_record(f"frames/{annotations_digest}/{shard}", record)

    def frame_index_checksums(self, annotations_digest: str) -> dict[str, str]:
        """Checksum of every index shard of these annotations (what COMPLETE.json records)."""
        found = {}
        for key in self.list_keys(f"frames/{annotations_digest}"):
            record = self.read_json(key)
            self._check_index_shard(key, annotations_digest, self._unseal(key, record))
            found[key] = record[RECORD_CHECKSUM]
        return found

    def frame_index(self, annotations_digest: str, recorded: Mapping[str, str] | None = None) -> dict[str, str]:
        """annotation image string -> frame content hash, as recorded by precompute.

        Every shard's checksum, annotation digest and fingerprint ids are checked; with
        ``recorded`` (COMPLETE.json's ``frame_index``) the shards must be exactly those, unchanged.
        """
        keys = self.list_keys(f"frames/{annotations_digest}")
        if recorded is not None and set(keys) != set(recorded):
            extra, gone = sorted(set(keys) - set(recorded)), sorted(set(recorded) - set(keys))
            raise JobError(
                f"the frame index of {self.url} is not the one precompute completed with "
                f"(added: {extra[:3]}, removed: {gone[:3]}); rerun `janus-job precompute`"
            )
        merged: dict[str, str] = {}
        self._index_shard = {}
        for key in keys:
            raw = self.read_json(key)
            record = self._unseal(key, raw)
            self._check_index_shard(key, annotations_digest, record)
            if recorded is not None and raw[RECORD_CHECKSUM] != recorded[key]:
                raise JobError(
                    f"{self.url}/{key} is not the frame index precompute completed with (its checksum differs "
                    "from COMPLETE.json's): it was rewritten afterwards. Refusing to train on it: rerun "
                    "`janus-job precompute`"
                )
            for image, digest in record["frames"].items():
                if merged.setdefault(image, digest) != digest:
                    raise JobError(f"{self.url}/{key} maps frame {image} to another hash than an earlier shard; "
                                   "rerun `janus-job precompute`")
                self._index_shard.setdefault(image, key)
        return merged

    def completed_frame_index(self, annotations_digest: str, *, frame_paths: Mapping[str, str] | None = None,
                              spot_check: int = 0) -> dict[str, str]:
        """The frame index as COMPLETE.json recorded it (JobError naming what differs).

        With ``frame_paths`` (image -> path), ``spot_check`` frames spread over the index are
        re-hashed: an index remapped together with its checksums still does not match the frames.
        """
        completion = self.completion(annotations_digest)
        if completion is None:
            raise JobError(f"{self.url} has no COMPLETE.json for these annotations: run `janus-job precompute`")
        if not isinstance(completion.get("frame_index"), dict):
            raise JobError(f"{self.url}/{self.marker_prefix(annotations_digest)}/COMPLETE.json records no frame "
                           "index checksums (an older precompute): rerun `janus-job precompute`")
        index = self.frame_index(annotations_digest, recorded=completion["frame_index"])
        if frame_paths and spot_check:
            problems, _checked = self.check_frame_hashes(index, frame_paths, limit=spot_check,
                                                         endpoint_url=self.endpoint_url)
            if problems:
                raise JobError(
                    f"the frame index of {self.url} does not match the frames ({len(problems)} of the frames "
                    f"checked; first: {problems[0]}). Refusing to train on it: the frames changed after "
                    "precompute, or the index was rewritten; rerun `janus-job precompute`"
                )
        return index

    def _check_index_shard(self, key: str, annotations_digest: str, record: dict) -> None:
        if record.get("format") != 2 or not isinstance(record.get("frames"), dict):
            raise JobError(f"{self.url}/{key} is not a frame index shard; delete it and rerun `janus-job precompute`")
        if record.get("annotations_digest") != annotations_digest:
            raise JobError(f"{self.url}/{key} belongs to other annotations ({record.get('annotations_digest')}); "
                           "delete it and rerun `janus-job precompute`")
        tied = record.get("fingerprints") or {}
        for kind, fingerprint in self._fingerprints.items():
            if kind in tied and tied[kind] != fingerprint.id:
                raise JobError(
                    f"{self.url}/{key} was written for another {kind} fingerprint ({tied[kind]}, the store's is "
                    f"{fingerprint.id}); delete it and rerun `janus-job precompute`"
                )

    def index_shard_of(self, image: str) -> str | None:
        """The index shard the last frame_index call read ``image`` from."""
        return self._index_shard.get(image)

    def check_frame_hashes(self, index: Mapping[str, str], paths: Mapping[str, str], *,
                           limit: int | None = None, endpoint_url: str | None = None) -> tuple[list[str], int]:
        """Re-hashes frames (all, or ``limit`` spread evenly) and compares them with the index.

        Returns (problems, frames checked); a frame that cannot be read is not counted as checked.
        """
        from janus_job.io import read_bytes

        images = sorted(index)
        if limit is not None and len(images) > limit:
            step = len(images) / limit
            images = [images[int(k * step)] for k in range(limit)]
        problems, checked = [], 0
        for image in images:
            path = paths.get(image)
            if path is None:
                continue
            try:
                actual = hashlib.sha256(read_bytes(path, endpoint_url)).hexdigest()
            except OSError:
                continue
            checked += 1
            if actual != index[image]:
                shard = self.index_shard_of(image)
                where = f"{self.url}/{shard}" if shard else f"the frame index of {self.url}"
                problems.append(f"frame {image} ({path}) has content {actual[:12]}..., {where} says "
                                f"{index[image][:12]}...")
        return problems, checked

    def marker_prefix(self, annotations_digest: str) -> str:
        return f"markers/{annotations_digest}"

    def completion(self, annotations_digest: str) -> dict | None:
        return self.read_record(f"{self.marker_prefix(annotations_digest)}/COMPLETE.json")

    def wait_complete(self, annotations_digest: str, timeout_s: float, poll_s: float = 10.0) -> dict:
        """Blocks until precompute's final marker for these annotations exists (JobError on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.completion(annotations_digest)
            if record is not None:
                return record
            now = time.monotonic()
            if now >= deadline:
                done = len(self.list_keys(self.marker_prefix(annotations_digest)))
                raise JobError(
                    f"precompute into {self.url} did not finish within {timeout_s:.0f}s "
                    f"({done} shard markers present, no COMPLETE.json): check the precompute Job's logs"
                )
            time.sleep(min(poll_s, max(deadline - now, 0.01)))

    def missing(self, samples: Iterable[Sample], frame_hashes: Mapping[str, str], *, vision: bool) -> list[str]:
        """Ids of samples with any feature absent from the store (one listing, no per-key requests)."""
        present = set(self.list_keys("spatial"))
        if vision:
            present |= set(self.list_keys("vision"))
        absent = []
        for sample in samples:
            hashes = [frame_hashes.get(image) for image in sample.images]
            if any(h is None for h in hashes):
                absent.append(sample.id)
                continue
            keys = [self.spatial_key(hashes)]
            if vision:
                keys += [self.vision_key(h) for h in hashes]
            if any(key not in present for key in keys):
                absent.append(sample.id)
        return absent

    def verify(self, *, check_checksums: bool = True) -> StoreReport:
        """Counts objects and bytes per kind and (optionally) reads every object to check it."""
        objects, sizes, corrupt = {}, {}, []
        for kind in KINDS:
            listed = self.list_sizes(kind)
            objects[kind] = len(listed)
            sizes[kind] = sum(listed.values())
            if check_checksums:
                for key in listed:
                    blob = self.get_bytes(key)
                    try:
                        decode_tensor(blob or b"", key)
                    except JobError:
                        corrupt.append(key)
        return StoreReport(
            objects=objects,
            bytes=sizes,
            corrupt=corrupt,
            stale_temp=self.temp_files(),
            manifests={kind: self.manifest(kind) for kind in KINDS},
        )


# ---------------------------------------------------------------- the trainer's feature source


class StoreFeatureSource:
    """Feature source for janus_job.data.dataset: spatial per sample, vision per frame, from the store.

    ``frame_hashes`` maps annotation image strings to content hashes (FeatureStore.frame_index);
    with ``hash_frames`` the frame files are hashed instead (read-through mode, or to distrust the
    index). In read-through mode ``compute_spatial`` / ``compute_vision`` fill misses and the
    result is written back (identical bytes from every rank, atomic put: races are harmless).
    """

    def __init__(
        self,
        store: FeatureStore,
        *,
        frame_hashes: Mapping[str, str] | None = None,
        image_root: str | os.PathLike | None = None,
        compute_spatial: Callable[[Sample], torch.Tensor] | None = None,
        compute_vision: Callable[[str], torch.Tensor] | None = None,
        quarantined: Iterable[str] | None = None,
        vision: bool = True,
    ) -> None:
        self.store = store
        self.frame_hashes = dict(frame_hashes) if frame_hashes is not None else None
        self.image_root = image_root
        self.compute_spatial = compute_spatial
        self.compute_vision = compute_vision
        self.vision = vision  # vision features come from the store too
        # quarantined when this run started (a restart must not fail on them again), and since
        self.known_bad = set(store.quarantined() if quarantined is None else quarantined)
        self.met_bad: set[str] = set()

    def sample_keys(self, sample: Sample) -> list[str]:
        """Every store key the sample's features are read from."""
        hashes = [self.frame_hash(image) for image in sample.images]
        keys = [self.store.spatial_key(hashes)]
        if self.vision:
            keys += [self.store.vision_key(h) for h in hashes]
        return keys

    def bad_samples(self, samples: Iterable[Sample]) -> dict[str, str]:
        """sample id -> a quarantined key it reads, for the samples that read one."""
        if not self.known_bad:
            return {}
        found = {}
        for sample in samples:
            hit = next((key for key in self.sample_keys(sample) if key in self.known_bad), None)
            if hit is not None:
                found[sample.id] = hit
        return found

    def frame_hash(self, image: str) -> str:
        if self.frame_hashes is not None:
            found = self.frame_hashes.get(image)
            if found is not None:
                return found
            if self.compute_vision is None and self.compute_spatial is None:
                raise JobError(
                    f"frame {image} is not in the store's frame index: the store was built from other "
                    "annotations; rerun `janus-job precompute` for these annotations"
                )
        path = os.path.join(str(self.image_root), image) if self.image_root else image
        return sha256_file(path)

    def get_spatial(self, sample: Sample) -> torch.Tensor:
        key = self.store.spatial_key([self.frame_hash(image) for image in sample.images])
        return self._read_through(key, self.compute_spatial, sample, f"spatial features of sample {sample.id}")

    def get_vision(self, frame_ref: str) -> torch.Tensor:
        key = self.store.vision_key(self.frame_hash(frame_ref))
        return self._read_through(key, self.compute_vision, frame_ref, f"vision features of frame {frame_ref}")

    def _read_through(self, key: str, compute: Any, item: Any, what: str) -> torch.Tensor:
        """The stored tensor; on a miss, `compute(item)` written back, or JobError without one.

        A corrupt object is quarantined in the store; with `compute` it is recomputed (and the
        quarantine ended), without it BadSample is raised for the bad-sample policy to handle.
        """
        bad = key in self.known_bad or key in self.met_bad
        tensor = None
        if not bad:
            try:
                tensor = self.store.get_tensor(key)
            except CorruptObject as err:
                self.store.quarantine(key, str(err))
                self.met_bad.add(key)
                if compute is None:
                    raise BadSample(f"{what}: {err}; quarantined in {self.store.url}/{QUARANTINE}/", key,
                                    known=False) from None
                bad = True
        if tensor is not None:
            return tensor
        if compute is None:
            if bad:
                raise BadSample(f"{what} ({key}) are quarantined as corrupt in {self.store.url}; "
                                "rerun `janus-job precompute` to recompute them", key, known=key in self.known_bad)
            raise JobError(f"{what} are missing from {self.store.url} ({key})")
        tensor = compute(item).to("cpu")
        self.store.put_tensor(key, tensor)
        if bad:
            self.store.release(key)
            self.known_bad.discard(key)
            self.met_bad.discard(key)
        return tensor


# ---------------------------------------------------------------- helpers


def has_url_credentials(url: str | None) -> bool:
    """True when a URL carries credentials before its host (``scheme://user:secret@host``)."""
    scheme, sep, rest = (url or "").partition("://")
    return bool(sep and scheme) and "@" in rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]


def _refuse_url_credentials(what: str, url: str | None) -> None:
    if has_url_credentials(url):
        scheme = str(url).partition("://")[0]
        raise JobError(
            f"{what} ({scheme}://...) holds credentials inside the URL: remove them (they are not repeated "
            "here) and put them in the Secret named by features.credentials_secret (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY)"
        )


def _split_url(url: str) -> tuple[str, str]:
    _refuse_url_credentials("features.store", url)
    if url.startswith("s3://"):
        root = url[len("s3://") :].strip("/")
        if not root:
            raise JobError(f"features.store {url!r} names no bucket: use s3://bucket/prefix")
        return "s3", root
    if url.startswith("file://"):
        return "file", os.path.abspath(url[len("file://") :]).rstrip("/") or "/"
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise JobError(f"features.store scheme {scheme}:// is not supported: use s3:// or file://")
    return "file", os.path.abspath(url).rstrip("/") or "/"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
