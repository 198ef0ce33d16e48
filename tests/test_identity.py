"""wsi_qc.identity: the one hashing implementation; the schemes routed through it keep their old values (saved
scorers, stores and calibrations stay valid)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from wsi_qc import identity
from wsi_qc.config import fingerprint
from wsi_qc.flow import _fingerprint
from wsi_qc.slide import Slide
from wsi_qc.store import slide_key
from wsi_qc.weights import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def test_one_hashing_implementation():
    users = [p.relative_to(ROOT).as_posix() for folder in ("wsi_qc", "pipelines", "benchmarks")
             for p in sorted((ROOT / folder).rglob("*.py")) if re.search(r"^\s*import hashlib|hashlib\.", p.read_text(),
                                                                          re.M)]
    assert users == ["wsi_qc/identity.py"]


def test_json_digest_is_stable_over_key_order():
    a = {"b": 1, "a": {"y": [1, 2], "x": None}}
    b = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert identity.json_digest(a) == identity.json_digest(b)
    assert identity.json_digest(a) != identity.json_digest({**a, "b": 2})
    assert fingerprint(a) == fingerprint(b) == identity.json_digest(a, 16)


def test_code_digest_changes_with_the_source():
    def one(x):
        return x + 1

    def two(x):
        return x + 2

    assert identity.code_digest(one) == identity.code_digest(one)
    assert identity.code_digest(one) != identity.code_digest(two)


def test_old_values_are_kept(tmp_path):
    """The same sha256 over the same bytes as before identity.py: saved scorers' fingerprints, stored head digests,
    config fingerprints and long slide ids do not change."""
    weights = tmp_path / "flow.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    meta = {"z": 1, "a": {"k": [1.5, "x"]}, "fingerprint": "ignored"}
    old = hashlib.sha256(weights.read_bytes())
    old.update(json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}, sort_keys=True).encode())
    assert _fingerprint(weights, meta) == old.hexdigest()
    assert sha256_file(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    config = {"tiles": {"size": 64, "mpp": 0.5}, "run": {"pattern": "*.tif"}}
    assert fingerprint(config) == hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    long_id = "x" * 300
    assert slide_key(long_id).endswith(hashlib.sha256(long_id.encode()).hexdigest()[:16])
    head = weights.read_bytes()[:1 << 20]
    want = f"sha256:{hashlib.sha256(head).hexdigest()}:{weights.stat().st_size}"
    assert identity.head_digest(weights) == want
    image = np.random.default_rng(1).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    with Slide.from_array(image, mpp=0.5) as slide:
        assert slide.sha256_head() == f"sha256:{hashlib.sha256(image.reshape(-1)[:1 << 20].tobytes()).hexdigest()}:" \
                                      f"{image.nbytes}"


def test_file_state_tells_a_replaced_file(tmp_path):
    path = tmp_path / "slide.tif"
    path.write_bytes(b"a" * 100)
    before = identity.file_state(path)
    assert identity.file_state(path) == before
    path.write_bytes(b"b" * 100)
    assert identity.file_state(path)["head"] != before["head"]
