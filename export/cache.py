"""Content-addressed artifact cache: SHA-256 keys, atomic all-or-nothing writes, verified reads.

Layout under the root (default ~/.cache/lumen, or $LUMEN_CACHE_DIR):
    <key>/          the artifact files of one entry (e.g. unet.onnx, unet.onnx.data)
    <key>.json      sidecar: key fields, and size + sha256 of every file; written last
    <key>.lock      the build lock of that key (an OS lock: released when its holder dies)
An entry exists only when its sidecar does and every file matches it, so a build killed at any
point leaves no entry, and a truncated or bit-flipped file is noticed on the next lookup.
Processes that miss the same key at once (replicas starting together) build it once: the first
takes the key's lock and builds, the others wait on the lock and then find the entry.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import filelock
import torch

from lumen.engine.errors import InvalidInputError

ENV_VAR = "LUMEN_CACHE_DIR"
SIDECAR_FORMAT = 1
LOCK_TIMEOUT_S = 4 * 3600.0  # longer than any TensorRT build of a large UNet
_CHUNK = 16 << 20


class CacheWarning(UserWarning):
    """A cache entry was corrupt or did not match its key; it is dropped and rebuilt."""


class CacheLockTimeout(TimeoutError):
    """Another live process held a cache key's build lock for longer than lock_timeout_s."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Argument, else $LUMEN_CACHE_DIR, else $XDG_CACHE_HOME/lumen, else ~/.cache/lumen."""
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_VAR)
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache_dir = Path(base) / "lumen"
    return Path(cache_dir).expanduser()


def key_of(fields: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the fields that determine an artifact."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer: name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Viewing as bytes works for every dtype, bfloat16 included (numpy has no bfloat16).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temp file in the same directory, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class ArtifactCache:
    """Entries keyed by key_of(fields); get_or_build verifies on read and builds on a miss."""

    def __init__(self, root: str | os.PathLike | None = None, lock_timeout_s: float = LOCK_TIMEOUT_S):
        if not lock_timeout_s > 0:
            raise InvalidInputError(f"lock_timeout_s={lock_timeout_s!r}; expected seconds > 0")
        self.root = cache_root(root)
        self.lock_timeout_s = lock_timeout_s

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    def sidecar(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get_or_build(self, fields: dict[str, Any],
                     build: Callable[[Path], None]) -> tuple[Path, bool]:
        """(entry dir, hit). build(staging_dir) writes the artifact files into staging_dir.

        A complete entry is read without the lock; on a miss the key's lock is taken and the
        entry looked up again, since another process may have built it in the meantime.
        """
        key = key_of(fields)
        found = self.find(key, fields)
        if found is not None:
            return found, True
        with self.lock(key):
            found = self.lookup(key, fields)
            if found is not None:
                return found, True
            return self.store(key, fields, build), False

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold key's build lock: an OS-level lock (fcntl), so a killed holder releases it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{key}.lock"
        held = filelock.FileLock(path, timeout=self.lock_timeout_s)
        try:
            held.acquire()
        except filelock.Timeout as err:
            raise CacheLockTimeout(
                f"waited {self.lock_timeout_s:g} s for {path}: another live process is building "
                f"this cache entry; expected it to finish within lock_timeout_s="
                f"{self.lock_timeout_s:g} (raise it, or stop that process)") from err
        try:
            yield
        finally:
            held.release()

    def find(self, key: str, fields: dict[str, Any]) -> Path | None:
        """The entry dir if it is complete and verifies, else None; changes nothing (no lock).

        An invalid entry is left for lookup to drop, under the lock: dropping it here could
        delete the entry another process is renaming into place.
        """
        sidecar = self.sidecar(key)
        if sidecar.exists() and self._verify(key, fields, sidecar) is None:
            return self.entry_dir(key)
        return None

    def lookup(self, key: str, fields: dict[str, Any]) -> Path | None:
        """The entry dir if its sidecar and every file check out; else None (bad entries dropped)."""
        sidecar = self.sidecar(key)
        if not sidecar.exists():
            return None
        problem = self._verify(key, fields, sidecar)
        if problem is None:
            return self.entry_dir(key)
        warnings.warn(f"cache entry {sidecar} is invalid ({problem}); rebuilding it",
                      CacheWarning, stacklevel=3)
        self.remove(key)
        return None

    def metadata(self, key: str) -> dict[str, Any]:
        return json.loads(self.sidecar(key).read_text())

    def digest(self, key: str) -> str:
        """SHA-256 over the entry's file names and hashes: identifies its content as a whole."""
        return key_of(self.metadata(key)["files"])

    def _verify(self, key: str, fields: dict[str, Any], sidecar: Path) -> str | None:
        try:
            meta = json.loads(sidecar.read_text())
            files = meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable sidecar: {e}"
        if meta.get("format") != SIDECAR_FORMAT or meta.get("key") != key:
            return "sidecar format or key does not match"
        if key_of(meta.get("fields", {})) != key_of(fields):
            return "key fields do not match"
        try:
            for name, expected in files.items():
                problem = self._verify_file(self.entry_dir(key) / name, expected["size"],
                                            expected["sha256"])
                if problem:
                    return problem
        except (KeyError, TypeError, AttributeError) as e:  # valid JSON, wrong structure
            return f"malformed sidecar file record: {e!r}"
        return None

    @staticmethod
    def _verify_file(path: Path, size: int, sha256: str) -> str | None:
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size != size:
            return f"{path.name} has {path.stat().st_size} bytes, sidecar says {size}"
        digest = file_sha256(path)
        if digest != sha256:
            return f"{path.name} sha256 {digest[:12]}..., sidecar says {sha256[:12]}..."
        return None

    def store(self, key: str, fields: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """Build into a staging dir, fsync, rename it into place, then write the sidecar.

        Callers hold lock(key) (get_or_build does), so that one process builds a key at a time.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_dead_staging(key)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{key[:16]}-{os.getpid()}-"))
        try:
            build(staging)
            files = {}
            for path in sorted(p for p in staging.iterdir() if p.is_file()):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
            if not files:
                raise RuntimeError(f"building cache entry {key} wrote no files")
            _fsync_dir(staging)
            self.remove(key)
            os.replace(staging, self.entry_dir(key))
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        meta = {"format": SIDECAR_FORMAT, "key": key, "fields": fields, "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_bytes(self.sidecar(key), json.dumps(meta, indent=1, default=str).encode())
        return self.entry_dir(key)

    def remove(self, key: str) -> None:
        """Sidecar first, so a crash half-way leaves files without an entry, never the reverse."""
        self.sidecar(key).unlink(missing_ok=True)
        shutil.rmtree(self.entry_dir(key), ignore_errors=True)

    def _remove_dead_staging(self, key: str) -> None:
        # Staging dirs of builds that were killed (their pid is gone) are garbage.
        for path in self.root.glob(f".tmp-{key[:16]}-*"):
            pid = path.name.split("-")[2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def entry_size(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.iterdir() if p.is_file())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory is fsynced (POSIX); Windows cannot open dirs.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
