"""Content-addressed, crash-safe cache of image profiles on disk.

Key
    ``key = sha256("vlmfilm-key/v1" \\0 pixel_digest \\0 fingerprint)`` as 64 lowercase hex chars, where
    ``pixel_digest`` is :func:`~monai_vlmfilm.profiles.base.pixel_digest` of the canonical pixels
    (float32 of raw intensities plus shape, transpose-invariant, so a file path, MONAI ``LoadImage``
    output (transposed by its PIL reader), a channel-first MetaTensor and a PIL array of one image all
    give one key) and ``fingerprint`` is the profiler's fingerprint (model id and revision, prompt,
    mode, processor settings, code version): a new prompt or model never reads stale profiles.

Layout on disk::

    <cache_dir>/v1/<key[:2]>/<key>.json      one entry per (image, profiler fingerprint)
    <cache_dir>/v1/<key[:2]>/.tmp-<host>-<pid>-<random>.json   in-flight writes (renamed or removed)
    <cache_dir>/v1/path_memo.json            optional memo  abs path -> [size, mtime_ns, inode, pixel_digest]

Entry document (JSON, UTF-8)::

    {"format": "monai_vlmfilm.profile", "version": 1, "key": "<64 hex>", "fingerprint": "<str>",
     "pixel_digest": "<64 hex>", "created": <unix time>, "profile": {VLMProfile.to_json_dict()},
     "checksum": sha256 of the canonical JSON of {"fingerprint", "key", "profile"}}

Guarantees
    * writes are atomic (temp file in the same directory, ``fsync``, ``os.replace``): readers see the
      old entry, the new entry or none, never half a file; concurrent writers of one key both write
      a complete, equal-meaning document;
    * an unreadable, truncated, wrong-key, wrong-checksum or out-of-range entry is logged as a
      warning, counted in ``stats.corrupt`` and treated as a miss (a recompute overwrites it);
    * JSON only: nothing is unpickled or executed; keys must be 64 hex chars, so no key can name a
      path outside the cache directory;
    * ``read_only=True`` (or a read-only directory) serves hits and raises
      :class:`ProfileStoreError` naming the directory on write; disk-full / permission errors leave
      no partial file.

The path memo (path + size + mtime_ns + inode -> pixel digest) spares re-reading and re-hashing a
file on every lookup; validated hits are also kept in memory (entries are content-addressed, so a
hit stays right for the life of the process).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import describe_write_error
from .base import ImageReadError, Profiler, canonical_image, pixel_digest
from .schema import VLMProfile

__all__ = ["Lookup", "ProfileStore", "ProfileStoreError", "StoreStats", "entry_checksum"]

logger = logging.getLogger(__name__)

LAYOUT_VERSION = "v1"
ENTRY_FORMAT = "monai_vlmfilm.profile"
ENTRY_VERSION = 1
MAX_ENTRY_BYTES = 1 << 20
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_ENTRY_RE = re.compile(r"[0-9a-f]{64}\.json")
_HOST = socket.gethostname().replace("-", "_")[:32] or "host"


class ProfileStoreError(OSError):
    """A write to the profile cache failed (read-only store or directory, disk full, permissions)."""


@dataclass
class Lookup:
    """One image's cache lookup (:meth:`ProfileStore.lookup`).

    Attributes:
        source: the image as given (path, array, Tensor, MetaTensor), read again when ``pixels`` is None.
        key: the cache key (pixel digest + profiler fingerprint).
        digest: the pixel digest.
        pixels: the canonical pixels when they had to be read for hashing (None after a path-memo hit).
        profile: the cached profile, None on a miss.
    """

    source: Any
    key: str
    digest: str
    pixels: np.ndarray | None
    profile: VLMProfile | None

    def image(self) -> np.ndarray:
        """The canonical pixels for a profiler (read from ``source`` when hashing did not read them)."""
        return self.pixels if self.pixels is not None else canonical_image(self.source)


@dataclass
class StoreStats:
    """Per-process counters of one :class:`ProfileStore`."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    writes: int = 0
    memo_hits: int = 0
    hashed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_checksum(key: str, fingerprint: str, profile: dict[str, Any]) -> str:
    return hashlib.sha256(_canon({"fingerprint": fingerprint, "key": key, "profile": profile})).hexdigest()


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in entry")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class ProfileStore:
    """Content-addressed profile cache (see the module docstring for keys, layout and guarantees).

    Args:
        cache_dir: root folder; created on first write.
        read_only: serve hits only; every write raises :class:`ProfileStoreError`.
        fsync: ``fsync`` entries and their folder on write (durability after power loss).
        memory_cache: keep validated hits in memory (the fast path for training).
    """

    def __init__(
        self, cache_dir: str | os.PathLike, read_only: bool = False, fsync: bool = True, memory_cache: bool = True
    ) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.root = self.cache_dir / LAYOUT_VERSION
        self.read_only = bool(read_only)
        self.fsync = bool(fsync)
        self.memory_cache = bool(memory_cache)
        self.stats = StoreStats()
        self._memo: dict[str, tuple[int, int, int, str]] = {}
        self._disk_memo: dict[str, list] | None = None
        self._hits: dict[str, VLMProfile] = {}

    # ----------------------------------------------------------------- pickling (DataLoader workers)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["stats"] = StoreStats()
        state["_hits"] = {}
        state["_disk_memo"] = None
        return state

    def __repr__(self) -> str:
        return f"ProfileStore({str(self.cache_dir)!r}, read_only={self.read_only})"

    # ----------------------------------------------------------------- keys
    @staticmethod
    def check_key(key: Any) -> str:
        """Return ``key`` if it is 64 lowercase hex chars, else raise ``ValueError`` (no path tricks)."""
        if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
            raise ValueError(f"invalid profile cache key {str(key)[:80]!r}: expected 64 lowercase hex characters")
        return key

    @staticmethod
    def is_key(obj: Any) -> bool:
        return isinstance(obj, str) and _KEY_RE.fullmatch(obj) is not None

    @staticmethod
    def make_key(digest: str, fingerprint: str) -> str:
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str, got {type(fingerprint).__name__}")
        return hashlib.sha256(f"vlmfilm-key/v1\0{digest}\0{fingerprint}".encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        key = self.check_key(key)
        return self.root / key[:2] / f"{key}.json"

    def _memo_file(self) -> Path:
        return self.root / "path_memo.json"

    def _load_disk_memo(self) -> dict[str, list]:
        if self._disk_memo is None:
            self._disk_memo = {}
            try:
                with open(self._memo_file(), "rb") as f:
                    doc = json.loads(f.read(64 << 20), parse_constant=_reject_constant)
                entries = doc.get("entries", {}) if isinstance(doc, dict) else {}
                for p, v in entries.items():
                    if (
                        isinstance(v, list)
                        and len(v) == 4
                        and all(isinstance(i, int) for i in v[:3])
                        and self.is_key(v[3])
                    ):
                        self._disk_memo[p] = v
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError) as e:
                logger.warning("ignoring unreadable path memo %s: %s", self._memo_file(), e)
        return self._disk_memo

    def path_digest(self, path: str | os.PathLike) -> tuple[str, np.ndarray | None]:
        """Pixel digest of an image file through the memo; also the array when the file had to be read."""
        p = os.fspath(path)
        st = os.stat(p)
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        m = self._memo.get(p)
        if m is not None and m[:3] == sig:
            self.stats.memo_hits += 1
            return m[3], None
        disk_memo = self._load_disk_memo()
        disk = disk_memo.get(os.path.abspath(p)) if disk_memo else None
        if disk is not None and tuple(disk[:3]) == sig:
            self._memo[p] = (*sig, disk[3])
            self.stats.memo_hits += 1
            return disk[3], None
        arr = canonical_image(p)
        digest = pixel_digest(arr)
        self.stats.hashed += 1
        self._memo[p] = (*sig, digest)
        return digest, arr

    def save_path_memo(self) -> Path | None:
        """Persist the in-process path memo (merged with the one on disk) so other processes skip hashing."""
        if self.read_only or not self._memo:
            return None
        merged = dict(self._load_disk_memo())
        for p, (size, mtime, ino, digest) in self._memo.items():
            merged[os.path.abspath(p)] = [size, mtime, ino, digest]
        self._atomic_write(self._memo_file(), _canon({"version": 1, "entries": merged}))
        self._disk_memo = merged
        return self._memo_file()

    def digest(self, image: Any) -> str:
        """Pixel digest of a path (through the memo), array, Tensor or MetaTensor."""
        if isinstance(image, (str, os.PathLike)):
            return self.path_digest(image)[0]
        self.stats.hashed += 1
        return pixel_digest(image)

    def key(self, image: Any, fingerprint: str) -> str:
        """Cache key of ``image`` (path, array, Tensor, MetaTensor) under a profiler ``fingerprint``."""
        return self.make_key(self.digest(image), fingerprint)

    def _resolve_key(self, image_or_key: Any, fingerprint: str | None) -> str:
        if self.is_key(image_or_key):
            return image_or_key
        if isinstance(image_or_key, str) and not os.path.exists(image_or_key) and len(image_or_key) == 64:
            self.check_key(image_or_key)  # looks like a key but is not one: say so
        if fingerprint is None:
            raise ValueError("a fingerprint is needed to look up an image (pass the profiler's fingerprint)")
        return self.key(image_or_key, fingerprint)

    # ----------------------------------------------------------------- read
    def _corrupt(self, path: Path, why: str) -> None:
        self.stats.corrupt += 1
        logger.warning("corrupt profile cache entry %s (%s): treated as a miss and recomputed", path, why)

    def _read_entry(self, key: str, fingerprint: str | None) -> VLMProfile | None:
        path = self.entry_path(key)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_ENTRY_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._corrupt(path, f"unreadable: {e}")
            return None
        if len(raw) > MAX_ENTRY_BYTES:
            self._corrupt(path, "larger than an entry can be")
            return None
        try:
            doc = json.loads(raw, parse_constant=_reject_constant)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            if doc.get("format") != ENTRY_FORMAT or doc.get("version") != ENTRY_VERSION:
                raise ValueError(f"unknown format {doc.get('format')!r} v{doc.get('version')!r}")
            if doc.get("key") != key:
                raise ValueError("key in the entry does not match its file name")
            fp = doc.get("fingerprint")
            if not isinstance(fp, str) or (fingerprint is not None and fp != fingerprint):
                raise ValueError("fingerprint does not match")
            prof = doc.get("profile")
            if doc.get("checksum") != entry_checksum(key, fp, prof):
                raise ValueError("checksum mismatch")
            profile = VLMProfile.from_json_dict(prof)
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            self._corrupt(path, str(e)[:200])
            return None
        return profile

    def get_by_key(self, key: str, fingerprint: str | None = None) -> VLMProfile | None:
        """The validated profile stored under ``key`` or ``None`` (a miss; corrupt entries are misses)."""
        key = self.check_key(key)
        prof = self._hits.get(key)
        if prof is None:
            prof = self._read_entry(key, fingerprint)
        if prof is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        if self.memory_cache:
            self._hits[key] = prof
        return prof

    def get(self, image_or_key: Any, fingerprint: str | None = None) -> VLMProfile | None:
        """Profile of an image (path, array, Tensor, MetaTensor) or a key; ``None`` on a miss."""
        return self.get_by_key(self._resolve_key(image_or_key, fingerprint), fingerprint)

    def __contains__(self, key: str) -> bool:
        return self.is_key(key) and self.entry_path(key).is_file()

    # ----------------------------------------------------------------- write
    def _atomic_write(self, path: Path, data: bytes) -> None:
        if self.read_only:
            raise ProfileStoreError(
                f"profile cache {self.cache_dir} is read-only (read_only=True): cannot write {path.name}"
            )
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{_HOST}-{os.getpid()}-", suffix=".json")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            if self.fsync:
                dfd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                except OSError:
                    pass  # some file systems cannot fsync a directory
                finally:
                    os.close(dfd)
        except OSError as e:
            no_space = e.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
            why = describe_write_error(e)[1] if no_space else (e.strerror or e)
            raise ProfileStoreError(e.errno, f"cannot write to profile cache directory {self.cache_dir} ({why})") from e
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def put_by_key(self, key: str, profile: VLMProfile, fingerprint: str, pixel_digest: str = "") -> Path:
        """Write ``profile`` under ``key`` atomically; returns the entry path."""
        key = self.check_key(key)
        if not isinstance(profile, VLMProfile):
            raise TypeError(f"profile must be a VLMProfile, got {type(profile).__name__}")
        prof = profile.to_json_dict()
        doc = {
            "format": ENTRY_FORMAT,
            "version": ENTRY_VERSION,
            "key": key,
            "fingerprint": fingerprint,
            "pixel_digest": pixel_digest,
            "created": time.time(),
            "profile": prof,
            "checksum": entry_checksum(key, fingerprint, prof),
        }
        path = self.entry_path(key)
        self._atomic_write(path, _canon(doc))
        self.stats.writes += 1
        if self.memory_cache:
            self._hits[key] = profile
        return path

    def put(self, image_or_key: Any, profile: VLMProfile, fingerprint: str) -> str:
        """Store ``profile`` for an image (or key) under ``fingerprint``; returns the key."""
        if self.is_key(image_or_key):
            key, digest = image_or_key, ""
        else:
            digest = self.digest(image_or_key)
            key = self.make_key(digest, fingerprint)
        self.put_by_key(key, profile, fingerprint, digest)
        return key

    def lookup(self, image: Any, fingerprint: str) -> Lookup:
        """Digest -> key -> cached entry for one image: the one lookup of the transform, the CLI and the ablation.

        Args:
            image: a path (hashed through the path memo), array, Tensor or MetaTensor.
            fingerprint: the profiler's fingerprint.

        Raises:
            ImageReadError: the image cannot be read (a path) or is not an image.
        """
        if isinstance(image, (str, os.PathLike)):
            digest, arr = self.path_digest(image)
        else:
            arr = canonical_image(image)
            digest = pixel_digest(arr)
            self.stats.hashed += 1
        key = self.make_key(digest, fingerprint)
        return Lookup(image, key, digest, arr, self.get_by_key(key, fingerprint))

    def compute(
        self,
        misses: Sequence[Lookup],
        profiler: Profiler,
        batch_size: int | None = None,
        write_errors: list[tuple[str, ProfileStoreError]] | None = None,
    ) -> list[VLMProfile]:
        """Profile ``misses`` with ``profiler`` in batches and store each result under its key.

        Args:
            misses: lookups without a cached profile (one per key).
            profiler: the profiler whose fingerprint made the keys.
            batch_size: images per ``profiler.profile`` call (default: the profiler's ``batch_size``, else 8).
            write_errors: when a list, a failed write (read-only or full cache) is appended as ``(key, error)`` and
                the computed profile is still returned; when None it raises.

        Raises:
            ProfileStoreError: a write failed and ``write_errors`` is None.
            RuntimeError: the profiler returned another number of profiles than images.
        """
        fp = profiler.fingerprint
        bs = max(1, int(batch_size or getattr(profiler, "batch_size", 0) or 8))
        out: list[VLMProfile] = []
        for s in range(0, len(misses), bs):
            chunk = misses[s : s + bs]
            profs = profiler.profile([m.image() for m in chunk])
            if len(profs) != len(chunk):
                raise RuntimeError(f"{profiler!r} returned {len(profs)} profiles for {len(chunk)} images")
            for m, prof in zip(chunk, profs):
                try:
                    self.put_by_key(m.key, prof, fp, m.digest)
                except ProfileStoreError as e:
                    if write_errors is None:
                        raise
                    write_errors.append((m.key, e))
            out += profs
        return out

    def get_or_compute(
        self,
        images: Sequence[Any],
        profiler: Profiler,
        batch_size: int | None = None,
        unreadable: list[tuple[Any, str]] | None = None,
    ) -> list[VLMProfile]:
        """Profiles of ``images`` (paths, arrays, tensors): :meth:`lookup` each, :meth:`compute` the misses once per key.

        Args:
            images: the images.
            profiler: computes the misses; its fingerprint selects the entries.
            batch_size: as :meth:`compute`.
            unreadable: when a list, an image that cannot be read is appended as ``(image, reason)`` and gets None
                in the result; when None it raises.

        Raises:
            ImageReadError, OSError: an image cannot be read and ``unreadable`` is None.
        """
        out, misses, wanted = self.partition(images, profiler.fingerprint, unreadable)
        return self.fill_misses(out, misses, wanted, profiler, batch_size)  # type: ignore[return-value]

    def fill_misses(
        self,
        profiles: list[VLMProfile | None],
        misses: dict[str, Lookup],
        wanted: dict[str, list[int]],
        profiler: Profiler,
        batch_size: int | None = None,
    ) -> list[VLMProfile | None]:
        """:meth:`compute` the misses of a :meth:`partition` once per key and put each profile at every index that
        wants it; returns ``profiles``, filled in place."""
        for key, prof in zip(misses, self.compute(list(misses.values()), profiler, batch_size)):
            for j in wanted[key]:
                profiles[j] = prof
        return profiles

    def partition(
        self, images: Sequence[Any], fingerprint: str, unreadable: list[tuple[Any, str]] | None = None
    ) -> tuple[list[VLMProfile | None], dict[str, Lookup], dict[str, list[int]]]:
        """:meth:`lookup` every image: cached profiles in place, and the misses once per key.

        Returns:
            ``(profiles, misses, wanted)``: the cached profile of each image (None for a miss or an unreadable image),
            ``{key: Lookup}`` of the misses (the first image with those pixels), ``{key: [indices into images]}``.
        """
        fp = fingerprint
        out: list[VLMProfile | None] = [None] * len(images)
        misses: dict[str, Lookup] = {}
        wanted: dict[str, list[int]] = {}  # same pixels twice in one call: compute once
        for i, img in enumerate(images):
            try:
                found = self.lookup(img, fp)
            except (ImageReadError, OSError) as e:
                if unreadable is None:
                    raise
                unreadable.append((img, str(e)))
                continue
            if found.profile is not None:
                out[i] = found.profile
            elif found.key in misses:
                wanted[found.key].append(i)
            else:
                misses[found.key], wanted[found.key] = found, [i]
        return out, misses, wanted

    # ----------------------------------------------------------------- listing / maintenance
    def _entry_files(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for shard in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not (shard.is_dir() and len(shard.name) == 2):
                continue
            for e in sorted(os.scandir(shard.path), key=lambda e: e.name):
                if _ENTRY_RE.fullmatch(e.name):
                    yield Path(e.path)

    def keys(self) -> Iterator[str]:
        for p in self._entry_files():
            yield p.name[:-5]

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    def __len__(self) -> int:
        return sum(1 for _ in self._entry_files())

    def items(self, fingerprint: str | None = None) -> Iterator[tuple[str, VLMProfile]]:
        """Valid entries as ``(key, profile)``; with ``fingerprint`` only that profiler's (corrupt ones skipped)."""
        for key in self.keys():
            prof = self._read_entry(key, None)
            if prof is None:
                continue
            if fingerprint is not None and self.entry_fingerprint(key) != fingerprint:
                continue
            yield key, prof

    def entry_fingerprint(self, key: str) -> str | None:
        try:
            with open(self.entry_path(key), "rb") as f:
                doc = json.loads(f.read(MAX_ENTRY_BYTES), parse_constant=_reject_constant)
            return doc.get("fingerprint") if isinstance(doc, dict) else None
        except (OSError, ValueError):
            return None

    def fingerprints(self) -> dict[str, int]:
        """Entry counts per profiler fingerprint (valid entries only)."""
        counts: dict[str, int] = {}
        for key in self.keys():
            if self._read_entry(key, None) is not None:
                fp = self.entry_fingerprint(key) or ""
                counts[fp] = counts.get(fp, 0) + 1
        return counts

    def verify(self) -> dict[str, Any]:
        """Check every entry: ``{"valid": n, "corrupt": [paths], "tmp": [leftover temp files]}``."""
        valid, bad = 0, []
        for p in self._entry_files():
            if self._read_entry(p.name[:-5], None) is None:
                bad.append(str(p))
            else:
                valid += 1
        return {"valid": valid, "corrupt": bad, "tmp": [str(p) for p in self._tmp_files()]}

    def _tmp_files(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for shard in os.scandir(self.root):
            if shard.is_dir():
                for e in os.scandir(shard.path):
                    if e.name.startswith(".tmp-"):
                        yield Path(e.path)
        for e in os.scandir(self.root):
            if e.name.startswith(".tmp-"):
                yield Path(e.path)

    def cleanup_tmp(self, max_age_s: float = 3600.0) -> int:
        """Remove temp files left by killed writers: those of dead local processes, or older than ``max_age_s``."""
        if self.read_only:
            return 0
        n, now = 0, time.time()
        for p in list(self._tmp_files()):
            parts = p.name.split("-")
            dead = len(parts) >= 4 and parts[1] == _HOST and parts[2].isdigit() and not _pid_alive(int(parts[2]))
            try:
                if dead or now - p.stat().st_mtime > max_age_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n
