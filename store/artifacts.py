"""Content-addressed files on a filesystem: uploads stored once by sha256, packed models by candidate.

Writes go to a temporary file in the same directory and are renamed into place, so a crash or a full disk
never leaves a half-written artifact under its final name. Directories (packed models) are never replaced in
place: each write is a new version under a fresh name, the caller switches its database reference to it, and
only then are the other versions pruned, so whatever the database refers to is complete at every moment.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_KEY = re.compile(r"^[0-9a-zA-Z_.-]{1,128}$")
_VERSION_SEP = "@"


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, key: str) -> Path:
        # Keys come from our own hashes and ids; the check keeps any other string from escaping the root.
        if not _KEY.match(kind) or not _KEY.match(key) or key in (".", ".."):
            raise ValueError(f"invalid artifact name {kind}/{key}")
        return self.root / kind / key

    def write(self, kind: str, key: str, write_to: Callable[[Path], None]) -> Path:
        """Store the file `write_to(temporary path)` writes under kind/key, whole or not at all (a reader never
        sees half a file; a concurrent writer of the same key wins or loses whole)."""
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        os.close(fd)
        try:
            write_to(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def stage(self, kind: str, src: BinaryIO, max_bytes: int) -> StagedFile:
        """Copy `src` to a temporary file inside the store, hashing it; over max_bytes: TooLarge.

        Nothing is visible under a final name until `commit()`, so a rejected upload leaves no trace.
        """
        directory = self.root / kind
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(
                            f"the {kind[:-1] if kind.endswith('s') else kind} upload is over the limit "
                            f"of {max_bytes} bytes"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return StagedFile(self, kind, digest.hexdigest(), Path(tmp), size)

    def put_dir(self, kind: str, key: str, src_dir: Path) -> Path:
        """Store a finished directory as a new version of kind/key and return its path.

        Nothing that exists is touched: the version appears under its final name by one rename, after its files
        and the rename are on disk. Point the database at the returned path, then call `prune` to delete the
        versions it replaced.
        """
        base = self.path(kind, key)
        base.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=base.parent, prefix=f".incoming-{key}{_VERSION_SEP}"))
        try:
            for item in Path(src_dir).iterdir():
                shutil.copy2(item, staging / item.name)
                _fsync(staging / item.name)
            _fsync(staging)
            # '@' is not allowed in keys, so no key's name can collide with another key's versions.
            version = base.parent / f"{key}{_VERSION_SEP}{secrets.token_hex(8)}"
            os.rename(staging, version)  # a fresh name: rename never replaces a directory here
            _fsync(base.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def versions(self, kind: str, key: str) -> list[Path]:
        """Every stored version of kind/key, with the unversioned directory earlier releases wrote in place."""
        base = self.path(kind, key)
        if not base.parent.is_dir():
            return []
        prefix = f"{key}{_VERSION_SEP}"
        return sorted(p for p in base.parent.iterdir() if p.name == key or p.name.startswith(prefix))

    def prune(self, kind: str, key: str, keep: Path | None) -> None:
        """Delete every version of kind/key but `keep`, and the staging directories crashed writes left.

        Call it only after the database refers to `keep` (or to nothing), never before: until then an older
        version may be the one readers are sent to.
        """
        base = self.path(kind, key)
        keep = None if keep is None else Path(keep).resolve()
        staging = f".incoming-{key}{_VERSION_SEP}"
        doomed = [p for p in self.versions(kind, key) if p.resolve() != keep]
        if base.parent.is_dir():
            doomed += [p for p in base.parent.iterdir() if p.name.startswith(staging)]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TooLarge(ValueError):
    pass


class StagedFile:
    def __init__(self, store: ArtifactStore, kind: str, sha256: str, tmp: Path, size: int):
        self.store, self.kind, self.sha256, self.tmp, self.size = store, kind, sha256, tmp, size

    @property
    def final_path(self) -> Path:
        return self.store.path(self.kind, self.sha256)

    def commit(self) -> Path:
        final = self.final_path
        if final.exists():
            self.discard()  # identical uploads are stored once
        else:
            os.replace(self.tmp, final)
        return final

    def discard(self) -> None:
        if self.tmp.exists():
            self.tmp.unlink()
