"""Content-addressed files on a filesystem: uploads stored once by sha256, packed models by candidate.

Writes go to a temporary file in the same directory and are renamed into place, so a crash or a full disk
never leaves a half-written artifact under its final name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

_KEY = re.compile(r"^[0-9a-zA-Z_.-]{1,128}$")


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, key: str) -> Path:
        # Keys come from our own hashes and ids; the check keeps any other string from escaping the root.
        if not _KEY.match(kind) or not _KEY.match(key) or key in (".", ".."):
            raise ValueError(f"invalid artifact name {kind}/{key}")
        return self.root / kind / key

    def stage(self, kind: str, src: BinaryIO, max_bytes: int) -> "StagedFile":
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
                        raise TooLarge(f"the {kind[:-1] if kind.endswith('s') else kind} upload is over the limit "
                                       f"of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return StagedFile(self, kind, digest.hexdigest(), Path(tmp), size)

    def put_dir(self, kind: str, key: str, src_dir: Path) -> Path:
        """Move a finished directory into place atomically (rename), replacing nothing that exists."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=".incoming-"))
        try:
            for item in Path(src_dir).iterdir():
                shutil.copy2(item, staging / item.name)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final


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
