"""Identity: the one place that decides "is this the same thing?" for every cache, fingerprint and resume check.

Every digest here is sha256 (hex) over a stated sequence of bytes; the users name what they feed it and so what
must invalidate them:

- `Digest().file(path)` / `file_digest`: the bytes of a whole file (encoder weights, a scorer's flow weights,
  exported networks checked on load);
- `head_digest`: 'sha256:<hex>:<size>' of a file's first MiB (of an array's pixels) and its size, and
  `file_state`: that and the mtime (resume: a slide replaced under the same name is redone);
- `json_digest` / `Digest().json(value)`: JSON with sorted keys, so a dict's key order never matters (config
  fingerprints, a scorer's meta, study caches);
- `code_digest`: the source text of functions, classes or modules (inspect), so a change to the code that makes a
  cached result (an exported network's forward, a study's feature code) invalidates it;
- `Digest().tensors(state_dict)`: names and raw bytes of tensors (an exported network's parameters).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import numpy as np

HEAD_BYTES = 1 << 20  # bytes of a file's head that `head_digest` reads
_CHUNK = 1 << 20


def _json_bytes(value) -> bytes:
    """JSON of `value` with sorted keys (str() for what JSON lacks): the same bytes whatever the key order."""
    return json.dumps(value, sort_keys=True, default=str).encode()


class Digest:
    """sha256 over parts added in order; each method returns self, `hex(n)` gives the first n hex digits."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def bytes(self, data) -> Digest:
        self._h.update(data)
        return self

    def text(self, value: str) -> Digest:
        return self.bytes(str(value).encode())

    def json(self, value) -> Digest:
        return self.bytes(_json_bytes(value))

    def file(self, path: str | Path, limit: int | None = None) -> Digest:
        """The file's bytes (its first `limit` bytes when given), read in chunks."""
        left = limit
        with open(path, "rb") as fh:
            while left is None or left > 0:
                chunk = fh.read(_CHUNK if left is None else min(_CHUNK, left))
                if not chunk:
                    break
                self._h.update(chunk)
                if left is not None:
                    left -= len(chunk)
        return self

    def array(self, array) -> Digest:
        """The raw bytes of a numpy array (C order)."""
        return self.bytes(np.ascontiguousarray(array).data)

    def tensors(self, state: dict) -> Digest:
        """Name and raw bytes of every tensor of a torch state dict, in its order."""
        import torch

        for name, tensor in state.items():
            self.text(name)
            self.bytes(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return self

    def code(self, *objects) -> Digest:
        for obj in objects:
            self.text(_source(obj))
        return self

    def hex(self, n: int | None = None) -> str:
        return self._h.hexdigest()[:n]


def _source(obj) -> str:
    """Source text of a function, class or module; its qualified name when the source is not available."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


def file_digest(path: str | Path) -> str:
    """Hex sha256 of a whole file."""
    return Digest().file(path).hex()


def text_digest(value: str, n: int | None = None) -> str:
    """Hex sha256 of a string (utf-8)."""
    return Digest().text(value).hex(n)


def json_digest(value, n: int | None = None) -> str:
    """Hex sha256 of `value` as JSON with sorted keys: stable over a dict's key order."""
    return Digest().json(value).hex(n)


def code_digest(*objects, n: int | None = None) -> str:
    """Hex sha256 of the source of functions, classes or modules: changes when their code does."""
    return Digest().code(*objects).hex(n)


def head_digest(path: str | Path | None = None, array: np.ndarray | None = None) -> str:
    """'sha256:<hex>:<size>' of the first HEAD_BYTES of a file and its size in bytes, or of an array's pixels."""
    if array is not None:
        head = np.ascontiguousarray(array).reshape(-1).view(np.uint8)[:HEAD_BYTES]
        return f"sha256:{Digest().bytes(head.tobytes()).hex()}:{array.nbytes}"
    return f"sha256:{Digest().file(path, HEAD_BYTES).hex()}:{Path(path).stat().st_size}"


def file_state(path: str | Path) -> dict:
    """What a resumed run compares to tell a replaced file from the one it processed: size, mtime (ns) and the
    head digest."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": head_digest(path)}
