"""The embedding store (--embeddings DIR): corpus embeddings kept by (model fingerprint,
sentence_id), reused across builds; a changed model invalidates by fingerprint."""
import glob
import importlib.metadata
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from click.testing import CliRunner

import schemas
from pipelines import encoding, store
from pipelines.encoding import EncoderMismatchError, encoder_parts
from pipelines.files import stable_id
from pipelines.fingerprint import folder_digest
from pipelines.options import SBERT_BACKENDS, EmbedOptions
from pipelines.store import EmbedCorpus, model_fingerprint

from .conftest import RUNNER, SOFA_SENTENCES
from .test_cli_retrieval import file_bytes

EXTRA = ["A dog runs across the beach.", "Two children fly a kite in the park.", "A chef slices onions."]


def _embed(texts, folder, tmp_path, name, worker=lambda: None):
    """One pipeline run of EmbedCorpus; returns ({id: vector}, the store counters). `worker` runs
    after the pipeline is built (by this process as the launcher) and before it runs (its
    workers: this process too, FnApiRunner): what it changes, only the workers see."""
    out = tmp_path / f"{name}.npz"
    pipeline = TestPipeline(runner=RUNNER)
    embedded = (pipeline | beam.Create([(stable_id(t), t) for t in texts])
         | EmbedCorpus(EmbedOptions(batch_size=2), str(folder))).main
    _ = (embedded
         | beam.combiners.ToList()
         | beam.Map(lambda rows: np.savez(out, **{sid: v for (sid, _), v in rows})))
    worker()
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
                if c.key.metric.namespace == store.NAMESPACE}
    with np.load(out) as loaded:
        return {k: loaded[k] for k in loaded.files}, counters


def test_a_second_build_embeds_nothing_a_third_only_new_sentences(tmp_path):
    folder = tmp_path / "store"
    first, counts = _embed(SOFA_SENTENCES, folder, tmp_path, "first")
    assert counts.get("sentences_embedded") == len(SOFA_SENTENCES) and not counts.get("sentences_reused")
    (model_dir,) = os.listdir(folder)
    assert model_dir == model_fingerprint(EmbedOptions(batch_size=2))
    (written,) = glob.glob(str(folder / model_dir / "embeddings-*.parquet"))
    recorded = pq.read_schema(written).metadata[store.ENCODER_KEY]  # the encoder that made the file
    assert json.loads(recorded) == encoder_parts(EmbedOptions()) and \
        encoding.encoder_fingerprint(json.loads(recorded)) == model_dir

    second, counts = _embed(SOFA_SENTENCES, folder, tmp_path, "second")
    assert counts.get("sentences_reused") == len(SOFA_SENTENCES) and not counts.get("sentences_embedded")
    assert sorted(second) == sorted(first)
    for sid, vector in first.items():
        assert vector.dtype == np.float32 and vector.tobytes() == second[sid].tobytes()  # bit for bit

    third, counts = _embed(SOFA_SENTENCES + EXTRA, folder, tmp_path, "third")
    assert counts.get("sentences_reused") == len(SOFA_SENTENCES) and counts.get("sentences_embedded") == len(EXTRA)
    assert all(third[sid].tobytes() == v.tobytes() for sid, v in first.items())
    added = glob.glob(str(folder / model_dir / "embeddings-*.parquet"))
    assert len(added) == 2  # the new sentences went into a file of their own
    rows = [r for f in added for r in schemas.read_table(f, schemas.EMBEDDINGS).to_pylist()]
    assert sorted(r["sentence_id"] for r in rows) == sorted(stable_id(t) for t in SOFA_SENTENCES + EXTRA)


def _fake_store_file(folder, texts, value, options=EmbedOptions()):
    """A store file written by hand into `options`' folder, recording their encoder: vectors no
    model gives, so a reuse is unmistakable."""
    store._store_file((0, [(stable_id(t), np.full(384, value, np.float32)) for t in texts]),
                      str(folder / model_fingerprint(options)), encoder_parts(options))


def test_another_model_does_not_read_this_ones_vectors(tmp_path):
    folder = tmp_path / "store"
    _fake_store_file(folder, SOFA_SENTENCES, 0.5, EmbedOptions(backend="torch"))
    assert model_fingerprint(EmbedOptions(backend="torch")) != model_fingerprint(EmbedOptions())
    vectors, counts = _embed(SOFA_SENTENCES, folder, tmp_path, "other")
    assert counts.get("sentences_embedded") == len(SOFA_SENTENCES) and not counts.get("sentences_reused")
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors.values())  # embedded, not the stored 0.5s
    assert sorted(os.listdir(folder)) == sorted(model_fingerprint(EmbedOptions(backend=b)) for b in ("torch", None))


def test_an_unreadable_store_file_is_skipped_counted_and_its_sentences_embedded_again(tmp_path):
    folder = tmp_path / "store"
    model_dir = folder / model_fingerprint(EmbedOptions())
    _fake_store_file(folder, SOFA_SENTENCES[:2], 0.25)
    (model_dir / "embeddings-damaged.parquet").write_bytes(b"garbage!")
    vectors, counts = _embed(SOFA_SENTENCES, folder, tmp_path, "again")
    assert counts.get("unreadable_files") == 1
    assert counts.get("sentences_reused") == 2 and counts.get("sentences_embedded") == len(SOFA_SENTENCES) - 2
    assert all((vectors[stable_id(t)] == 0.25).all() for t in SOFA_SENTENCES[:2])  # read from the store


def _other_version(monkeypatch, package):
    """This process (a worker, from here on) has another version of `package` than the launcher had."""
    if package == "onnxruntime":
        import onnxruntime
        monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".other")
        return
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: real(name) + (".other" if name == package else ""))


@pytest.mark.parametrize("backend, package", [(None, "onnxruntime"), (None, "torch"), ("torch", "torch"),
                                              ("torch", "sentence-transformers")])
def test_a_worker_with_other_versions_refuses_before_it_embeds_or_writes(tmp_path, monkeypatch, backend, package):
    """The launcher names the store folder; a worker whose encoder is not the one that folder is
    named for (another onnxruntime or exporter for the ONNX default, another torch or
    sentence-transformers for torch) must not add its vectors there: it refuses in one line
    naming the differing part, and the store is as it was."""
    options = EmbedOptions(batch_size=2, backend=backend)
    launcher = encoder_parts(options)
    folder = tmp_path / "store"
    _fake_store_file(folder, SOFA_SENTENCES[:2], 0.25, options)  # a store in use: some reused, some missing
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    pipeline = TestPipeline(runner=RUNNER)
    _ = (pipeline | beam.Create([(stable_id(t), t) for t in SOFA_SENTENCES]) | EmbedCorpus(options, str(folder)))
    _other_version(monkeypatch, package)
    with pytest.raises(Exception) as raised:
        pipeline.run().wait_until_finish()
    version = launcher[package]
    message = next(str(e) for e in _chain(raised.value) if isinstance(e, EncoderMismatchError))
    assert len(message.splitlines()) == 1 and "--embeddings" in message
    assert f"({package} {version} on the launcher, {version}.other here)" in message
    assert encoding.encoder_fingerprint(launcher) in message and model_fingerprint(options) in message  # the worker's
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing added


def _chain(err):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def test_the_query_strings_are_embedded_by_the_store_folders_encoder_only(monkeypatch):
    """Retrieve's query embedding gets the store's encoder (EmbedCorpus.store_encoder): stored
    vectors and query vectors must come from one encoder, even when every corpus vector is reused
    (nothing else is embedded then)."""
    from pipelines.embed import EmbedSentences
    options = EmbedOptions(batch_size=2)
    assert EmbedCorpus(options).store_encoder is None
    launcher = EmbedCorpus(options, "/somewhere").store_encoder
    assert launcher == encoder_parts(options)
    pipeline = TestPipeline(runner=RUNNER)
    _ = pipeline | beam.Create([("q", "sofa woman")]) | EmbedSentences(options, expect_encoder=launcher)
    _other_version(monkeypatch, "onnxruntime")
    with pytest.raises(Exception, match="onnxruntime .* on the launcher"):
        pipeline.run().wait_until_finish()


def _run_inference_handlers(pipeline):
    """Every RunInference of the built (not run) pipeline: its full label -> its model handler."""
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.pipeline import PipelineVisitor

    found = {}

    class Visitor(PipelineVisitor):
        def enter_composite_transform(self, node):
            if isinstance(node.transform, RunInference):
                found[node.full_label] = node.transform._model_handler

    pipeline.visit(Visitor())
    return found


@pytest.mark.parametrize("store_dir", [None, "store"])
def test_every_embedding_of_a_build_with_a_store_checks_the_workers_encoder(tmp_path, store_dir):
    """Retrieve's two embeddings (the corpus's, the query strings') both carry the store folder's
    encoder: with every corpus vector stored, only the queries are embedded, and they must not be
    searched against another encoder's vectors. Without a store neither checks."""
    from pipelines.build import Retrieve
    from pipelines.options import BuildOptions
    options = BuildOptions(embeddings=str(tmp_path / store_dir) if store_dir else None,
                           embed=EmbedOptions(batch_size=2))
    pipeline = TestPipeline(runner=RUNNER)
    sentences = pipeline | "Sentences" >> beam.Create([(stable_id(t), t) for t in SOFA_SENTENCES])
    detections = pipeline | "Detections" >> beam.Create([{"image_id": "a", "labels": ["sofa"]}])
    _ = {"detections": detections, "sentences": sentences} | Retrieve(options, str(tmp_path / "spill"))
    handlers = _run_inference_handlers(pipeline)
    assert sorted(label.split("/")[1] for label in handlers) == ["EmbedCorpus", "EmbedQueries"]
    expected = encoder_parts(options.embed) if store_dir else None
    assert all(handler._expect_encoder == expected for handler in handlers.values())


def test_a_store_file_recording_another_encoder_or_none_is_skipped_and_counted(tmp_path):
    """A file copied into another encoder's folder, or one without the record, is never read."""
    folder = tmp_path / "store"
    _fake_store_file(folder, SOFA_SENTENCES[:2], 0.5, EmbedOptions(backend="torch"))
    (copied,) = (folder / model_fingerprint(EmbedOptions(backend="torch"))).glob("*.parquet")
    model_dir = folder / model_fingerprint(EmbedOptions())
    model_dir.mkdir()
    (model_dir / copied.name).write_bytes(copied.read_bytes())
    table = pq.read_table(copied)
    pq.write_table(table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items()
                                                  if k != store.ENCODER_KEY}), model_dir / "embeddings-unrecorded.parquet")
    vectors, counts = _embed(SOFA_SENTENCES, folder, tmp_path, "foreign")
    assert counts.get("unreadable_files") == 2 and not counts.get("sentences_reused")
    assert counts.get("sentences_embedded") == len(SOFA_SENTENCES)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors.values())  # embedded, not the 0.5s


def test_the_fingerprint_follows_the_model_files_and_how_it_runs(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"\x00" * 16)
    digest = folder_digest(str(model))
    (model / ".cache").mkdir()
    (model / ".cache" / "export.onnx").write_bytes(b"x")  # a cache kept inside: not the model
    assert folder_digest(str(model)) == digest
    (model / "sub" / "weights.bin").write_bytes(b"\x00" * 15 + b"\x01")
    assert folder_digest(str(model)) != digest
    cpu = model_fingerprint(EmbedOptions(model=str(model)))
    assert cpu == model_fingerprint(EmbedOptions(model=str(model), batch_size=7, fp16=False))  # fp16 is CUDA's only
    assert cpu != model_fingerprint(EmbedOptions(model=str(model), device="cuda"))
    assert model_fingerprint(EmbedOptions(model=str(model), device="cuda")) != \
        model_fingerprint(EmbedOptions(model=str(model), device="cuda", fp16=False))
    # each --sbert-backend gives other vectors; the CPU default is named as what it resolves to
    backends = {b: model_fingerprint(EmbedOptions(model=str(model), backend=b)) for b in SBERT_BACKENDS}
    assert len(set(backends.values())) == len(SBERT_BACKENDS) == 4 and cpu == backends[EmbedOptions().resolved_backend()]


def test_the_fingerprint_follows_what_the_onnx_file_depends_on(tmp_path, monkeypatch):
    """A changed SmoothQuant alpha or calibration text, export format or onnxruntime makes a new
    ONNX file (cache_key): its vectors must not be mixed with the old file's in the store."""
    import onnxruntime

    from pipelines import onnx_encoder, smoothquant
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    options = {b: EmbedOptions(model=str(model), backend=b) for b in SBERT_BACKENDS}
    before = {b: model_fingerprint(o) for b, o in options.items()}
    assert before == {b: model_fingerprint(o) for b, o in options.items()}  # the same settings: the same store
    assert onnx_encoder.export_tag("onnx-smoothquant") == \
        onnx_encoder.cache_key(str(model), "onnx-smoothquant").split("-")[-1]
    # the ONNX file's parts are named in the store's, so a refusal can say which one differs
    assert {"export format", "opset", "torch", "transformers", "onnxruntime", "smoothquant"} <= \
        encoder_parts(options["onnx-smoothquant"]).keys()

    monkeypatch.setattr(smoothquant, "SMOOTHING_ALPHA", smoothquant.SMOOTHING_ALPHA - 0.1)
    alpha = {b: model_fingerprint(o) for b, o in options.items()}
    assert alpha["onnx-smoothquant"] != before["onnx-smoothquant"]
    assert {b: v for b, v in alpha.items() if b != "onnx-smoothquant"} == \
        {b: v for b, v in before.items() if b != "onnx-smoothquant"}  # the others' files are unchanged
    monkeypatch.undo()

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("another calibration sentence\n")
    monkeypatch.setattr(smoothquant, "CALIBRATION_TEXT", str(calibration))
    assert model_fingerprint(options["onnx-smoothquant"]) != before["onnx-smoothquant"]
    monkeypatch.undo()

    monkeypatch.setattr(onnx_encoder, "EXPORT_FORMAT", onnx_encoder.EXPORT_FORMAT + 1)
    export = {b: model_fingerprint(o) for b, o in options.items()}
    assert all(export[b] != before[b] for b in onnx_encoder.ONNX_BACKENDS) and export["torch"] == before["torch"]
    monkeypatch.undo()

    monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".other")
    assert all(model_fingerprint(options[b]) != before[b] for b in onnx_encoder.ONNX_BACKENDS)
    assert model_fingerprint(options["torch"]) == before["torch"]  # torch's vectors do not pass through it
    monkeypatch.undo()
    assert {b: model_fingerprint(o) for b, o in options.items()} == before

    # the libraries that compute a vector: torch traces the export (and runs the torch backend),
    # transformers' model code is what it traces, sentence-transformers pools for torch only,
    # tokenizers tokenises for every backend
    for package, changes in [("torch", SBERT_BACKENDS), ("transformers", SBERT_BACKENDS),
                             ("sentence-transformers", ("torch",)), ("tokenizers", SBERT_BACKENDS)]:
        _other_version(monkeypatch, package)
        changed = {b for b, o in options.items() if model_fingerprint(o) != before[b]}
        assert changed == set(changes), package
        monkeypatch.undo()


@pytest.mark.slow
def test_a_build_with_another_k_reuses_the_store_and_writes_what_a_build_without_it_writes(tmp_path, monkeypatch):
    from pipelines.cli import main

    from .test_cli_retrieval import DETECTIONS
    from .conftest import write_jsonl
    dets = write_jsonl(tmp_path / "detections.jsonl", DETECTIONS)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(SOFA_SENTENCES + EXTRA) + "\n", encoding="utf-8")
    build = lambda out, *extra: CliRunner().invoke(main, [  # noqa: E731
        "build-retrieval", "--detections", dets, "--text", str(text), "--output", str(tmp_path / out), "--no-shards",
        "--batch-size", "4", *extra])
    store_dir = str(tmp_path / "store")
    first = build("first", "--k", "3", "--embeddings", store_dir)
    assert first.exit_code == 0, first.output
    assert f"0 sentences reused, {len(SOFA_SENTENCES) + len(EXTRA)} embedded and added" in first.output
    second = build("second", "--k", "2", "--embeddings", store_dir)
    assert second.exit_code == 0, second.output
    assert f"{len(SOFA_SENTENCES) + len(EXTRA)} sentences reused, 0 embedded" in second.output
    plain = build("plain", "--k", "2")
    assert plain.exit_code == 0, plain.output
    assert file_bytes(tmp_path / "second") == file_bytes(tmp_path / "plain")

    # every corpus vector is stored: a worker with another onnxruntime would embed only the query
    # strings, and those must not be searched against the other encoder's stored vectors
    from pipelines import cli
    run = cli._run
    monkeypatch.setattr(cli, "_run", lambda pipeline, **kw: (_other_version(monkeypatch, "onnxruntime"), run(pipeline, **kw))[1])
    stored = file_bytes(tmp_path / "store")
    refused = build("refused", "--k", "2", "--embeddings", store_dir)
    assert refused.exit_code != 0 and "onnxruntime" in refused.output and "on the launcher" in refused.output
    assert "Traceback" not in refused.output and file_bytes(tmp_path / "store") == stored
    assert not [name for name in os.listdir(tmp_path / "refused") if not name.startswith(".")]  # nothing published
