"""The loader's decoding: the .npy reader (np.load's result, its cache, refusals) and batch
decoding (the same samples and errors as one at a time)."""
import copy
import io
import json
import random

import numpy as np
import pytest

from schemas.corpus import encode_sample, load_npy
from vlp_train.data import decode, decode_batch

from .conftest import DIM, TAGS, make_sample


def npy(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.random.default_rng(0).standard_normal((36, 2048)).astype(np.float16),
    np.zeros((0, 4), np.float16),
    np.asfortranarray(np.arange(15.0).reshape(3, 5)),
    np.arange(7, dtype=">i4"),
])
def test_load_npy_equals_np_load_twice(array):
    data = npy(array)
    for _ in range(2):  # the second read takes the cached header
        loaded = load_npy(data)
        assert loaded.dtype == array.dtype and loaded.shape == array.shape
        np.testing.assert_array_equal(loaded, np.load(io.BytesIO(data), allow_pickle=False))


def test_load_npy_refuses_pickles_truncation_and_other_files():
    with pytest.raises(ValueError, match="object arrays"):
        load_npy(npy(np.array([1, "x"], dtype=object), allow_pickle=True))
    with pytest.raises(ValueError, match="smaller"):
        load_npy(npy(np.zeros((36, 2048), np.float16))[:-10])
    with pytest.raises(ValueError, match="not a .npy"):
        load_npy(b"PK\x03\x04 a zip, not an array")


def _raw(i: int, meta, feats) -> dict:
    js, npy = encode_sample(meta, feats) if not isinstance(meta, bytes) else (meta, encode_sample({}, feats)[1])
    return {"__key__": f"k{i}", "__url__": "t.tar", "json": js, "feats.npy": npy}


def test_decode_batch_keeps_the_good_samples_and_names_the_bad_ones(monkeypatch):
    rng = random.Random(0)
    prototypes = np.random.default_rng(0).standard_normal((len(TAGS), DIM))
    good = [make_sample(i, rng, prototypes) for i in range(6)]
    wrong_type = copy.deepcopy(good[1][0])
    wrong_type["width"] = "wide"  # caught by the Arrow type check only
    bad_span = copy.deepcopy(good[2][0])
    bad_span["sentences"][0]["phrases"][0]["start"] += 1  # caught by the invariants
    raws = [_raw(0, *good[0]), _raw(1, wrong_type, good[1][1]), _raw(2, bad_span, good[2][1]),
            _raw(3, b"{not json", good[3][1]), _raw(4, *good[4]), _raw(5, json.dumps([1, 2]).encode(), good[5][1])]
    decoded, errors = decode_batch(raws)
    assert [d["key"] for d in decoded] == ["k0", "k4"]
    for d, raw in zip(decoded, [raws[0], raws[4]]):
        one = decode(raw)
        assert d["meta"] == one["meta"] and np.array_equal(d["feats"], one["feats"])
    assert len(errors) == 4
    assert any("t.tar:k1" in e and "sample schema" in e for e in errors)
    assert any("t.tar:k2" in e and "does not match its span" in e for e in errors)
    assert any("t.tar:k3" in e and "undecodable" in e for e in errors)
    assert any("t.tar:k5" in e and "JSON object" in e for e in errors)
    import schemas
    import vlp_train.data
    calls = []
    checker = schemas.check_sample_types
    counting = lambda samples, where="samples": calls.append(len(samples)) or checker(samples, where)  # noqa: E731
    monkeypatch.setattr(schemas, "check_sample_types", counting)
    monkeypatch.setattr(vlp_train.data, "check_sample_types", counting)
    all_good, none = decode_batch([_raw(i, *good[i]) for i in (0, 4, 5)])
    assert [d["key"] for d in all_good] == ["k0", "k4", "k5"] and none == []
    assert calls == [3]  # one type check for the whole batch, none per sample
