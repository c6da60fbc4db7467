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
    null_tag, null_coordinate = copy.deepcopy(good[3][0]), copy.deepcopy(good[5][0])
    null_tag["tags"][-1] = None  # nulls pass Arrow's conversion: caught by the batch's null counts
    null_coordinate["boxes"][0][2] = None
    raws = [_raw(0, *good[0]), _raw(1, wrong_type, good[1][1]), _raw(2, bad_span, good[2][1]),
            _raw(3, b"{not json", good[3][1]), _raw(4, *good[4]), _raw(5, json.dumps([1, 2]).encode(), good[5][1]),
            _raw(6, null_tag, good[3][1]), _raw(7, null_coordinate, good[5][1])]
    decoded, errors = decode_batch(raws)
    assert [d["key"] for d in decoded] == ["k0", "k4"]
    for d, raw in zip(decoded, [raws[0], raws[4]]):
        one = decode(raw)
        assert d["meta"] == one["meta"] and np.array_equal(d["feats"], one["feats"])
    assert len(errors) == 6
    assert any("t.tar:k6" in e and "tags hold a null" in e for e in errors)
    assert any("t.tar:k7" in e and "boxes hold a null" in e for e in errors)
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


# -- property-based: whatever the bytes, a decoded sample that builds into views, or a named error --

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)


def _valid():
    rng = random.Random(0)
    return make_sample(0, rng, np.random.default_rng(0).standard_normal((len(TAGS), DIM)))


@st.composite
def _damaged(draw):
    """A valid sample's members, then cut, overwritten, replaced by random bytes or random JSON,
    or a field of the sample replaced by any JSON value."""
    meta, feats = _valid()
    js, data = encode_sample(meta, feats)
    kind = draw(st.sampled_from(["cut", "flip", "bytes", "json", "field"]))
    member = draw(st.sampled_from(["json", "feats.npy"]))
    raw = {"json": js, "feats.npy": data}
    if kind == "cut":
        raw[member] = raw[member][:draw(st.integers(0, len(raw[member])))]
    elif kind == "flip":
        value = bytearray(raw[member])
        for _ in range(draw(st.integers(1, 8))):
            value[draw(st.integers(0, len(value) - 1))] = draw(st.integers(0, 255))
        raw[member] = bytes(value)
    elif kind == "bytes":
        raw[member] = draw(st.binary(max_size=300))
    elif kind == "json":
        raw["json"] = json.dumps(draw(_JSON)).encode()
    else:
        field = draw(st.sampled_from(sorted(meta)))
        meta[field] = draw(_JSON)
        raw["json"] = json.dumps(meta).encode()
    if draw(st.booleans()):
        del raw[draw(st.sampled_from(["json", "feats.npy"]))]
    return {"__key__": "k", "__url__": "shard.tar", **raw}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_damaged())
def test_any_damaged_sample_decodes_and_builds_or_is_a_named_error(raw):
    from transformers import BertTokenizerFast

    from schemas.corpus import bundled_minilm_path
    from vlp_train.config import ObjectiveConfig
    from vlp_train.masking import BatchBuilder
    global _BUILDER
    if "_BUILDER" not in globals():
        _BUILDER = BatchBuilder(BertTokenizerFast.from_pretrained(bundled_minilm_path()),
                                {t: i for i, t in enumerate(TAGS)}, 40, 36, ObjectiveConfig())
    decoded, errors = decode_batch([raw])
    assert len(decoded) + len(errors) == 1
    if errors:
        assert errors[0].startswith("shard.tar:k")  # names the shard and the sample
    else:
        views = _BUILDER.build(decoded + [decode(_raw(1, *_valid()))], ["rt", "rp", "is"], random.Random(0))
        assert all(v["input_ids"].shape[0] == 2 for v in views.values())


def test_the_tag_vocabulary_is_read_with_the_corpus_label_rule(tmp_path):
    """Tags differing only in case or spacing are one tag for the trainer as for the pipeline."""
    from vlp_train.data import load_tag_vocab
    vocab = tmp_path / "tag_vocab.json"
    vocab.write_text(json.dumps({"schema_version": 1, "tags": ["Person", "cup", "person", "Dining  Table"]}))
    assert load_tag_vocab(str(vocab), []) == ["person", "cup", "dining table"]


def test_the_corpus_folder_of_a_shard_holds_its_tag_vocabulary(tmp_path):
    """One rule for where a local shard's corpus lies (the folder above shards/): the tag vocabulary
    and the sentences are found there; a remote shard has none (its vocabulary comes from a scan)."""
    from vlp_train.data import corpus_folder, load_tag_vocab
    shard = tmp_path / "corpus" / "shards" / "corpus-000000.tar"
    shard.parent.mkdir(parents=True)
    (tmp_path / "corpus" / "tag_vocab.json").write_text(json.dumps({"schema_version": 1, "tags": ["cup", "Person"]}))
    assert corpus_folder(str(shard)) == str(tmp_path / "corpus")
    assert corpus_folder("https://example.org/shards/corpus-000000.tar") is None
    assert corpus_folder("pipe:gsutil cat gs://b/shards/corpus-000000.tar") is None
    assert load_tag_vocab(None, [str(shard)]) == ["cup", "person"]
