"""Known ADM reference batches are checked against their published SHA-256 before any metric uses them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from latentforge_metrics import (
    FID,
    KID,
    KNOWN_REFERENCES,
    GaussianStats,
    PrecisionRecall,
    ReferenceFileError,
    evaluate_npz,
    save_reference,
    verify_reference,
)
from latentforge_metrics import npz as npz_module
from latentforge_metrics.npz import KnownReference, file_sha256

ADM_256 = "VIRTUAL_imagenet256_labeled.npz"


def _stats_file(path):
    stats = GaussianStats()
    stats.update(torch.randn(4100, 2048, generator=torch.Generator().manual_seed(0)).relu())
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    return save_reference(path, stats, images=images)


def test_the_table_holds_only_well_formed_entries():
    assert ADM_256 in KNOWN_REFERENCES
    for name, known in KNOWN_REFERENCES.items():
        assert name.endswith(".npz") and known.url.endswith(f"/{name}")
        assert len(known.sha256) == 64 and int(known.sha256, 16) >= 0 and known.size > 0


def test_sha256_is_streamed_in_chunks_and_equals_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    content = np.random.default_rng(0).bytes(100_003)
    path.write_bytes(content)
    assert file_sha256(path, chunk_size=4096) == hashlib.sha256(content).hexdigest()
    assert verify_reference(path) is False  # a name not in the table is not checked


def test_a_known_name_with_other_content_is_refused_naming_both_hashes(tmp_path):
    path = _stats_file(tmp_path / ADM_256)
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = KNOWN_REFERENCES[ADM_256].sha256
    with pytest.raises(ReferenceFileError) as err:
        verify_reference(path)
    message = str(err.value)
    for words in (str(path), found, expected, "check_reference", "bytes", KNOWN_REFERENCES[ADM_256].url):
        assert words in message
    with pytest.raises(ReferenceFileError, match=expected):
        FID(path)  # the metrics' load path checks too
    with pytest.raises(ReferenceFileError, match=expected):
        PrecisionRecall(path)
    with pytest.raises(ReferenceFileError, match=expected):
        evaluate_npz(tmp_path / "samples.npz", path)
    fid = FID(path, check_reference=False)  # skipped on request: the file is read as any other
    assert fid.reference.dim == 2048
    assert KID(path, check_reference=False).reference_path == path


def test_a_known_name_with_the_published_hash_passes(tmp_path, monkeypatch):
    path = _stats_file(tmp_path / ADM_256)
    content = path.read_bytes()
    known = KnownReference(hashlib.sha256(content).hexdigest(), len(content), f"https://example/{ADM_256}")
    monkeypatch.setitem(npz_module.KNOWN_REFERENCES, ADM_256, known)
    assert verify_reference(path) is True
    assert FID(path).reference.dim == 2048
    path.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))  # one bit flipped: a new digest, refused
    with pytest.raises(ReferenceFileError, match=known.sha256):
        verify_reference(path)
