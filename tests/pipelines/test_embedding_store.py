"""The embedding store (--embeddings DIR): corpus embeddings kept by (model fingerprint,
sentence_id), reused across builds; a changed model invalidates by fingerprint."""
import glob
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from click.testing import CliRunner

import schemas
from pipelines import store
from pipelines.files import stable_id
from pipelines.options import SBERT_BACKENDS, EmbedOptions
from pipelines.store import EmbedCorpus, folder_digest, model_fingerprint

from .conftest import RUNNER, SOFA_SENTENCES
from .test_cli_retrieval import file_bytes

EXTRA = ["A dog runs across the beach.", "Two children fly a kite in the park.", "A chef slices onions."]


def _embed(texts, folder, tmp_path, name):
    """One pipeline run of EmbedCorpus; returns ({id: vector}, the store counters)."""
    out = tmp_path / f"{name}.npz"
    pipeline = TestPipeline(runner=RUNNER)
    embedded = (pipeline | beam.Create([(stable_id(t), t) for t in texts])
         | EmbedCorpus(EmbedOptions(batch_size=2), str(folder))).main
    _ = (embedded
         | beam.combiners.ToList()
         | beam.Map(lambda rows: np.savez(out, **{sid: v for (sid, _), v in rows})))
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
    assert len(glob.glob(str(folder / model_dir / "embeddings-*.parquet"))) == 1

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


def _fake_store_file(folder, texts, value):
    """A store file written by hand: vectors no model gives, so a reuse is unmistakable."""
    store._store_file((0, [(stable_id(t), np.full(384, value, np.float32)) for t in texts]), str(folder))


def test_another_model_does_not_read_this_ones_vectors(tmp_path, monkeypatch):
    folder = tmp_path / "store"
    _fake_store_file(folder / model_fingerprint(EmbedOptions()), SOFA_SENTENCES, 0.5)
    monkeypatch.setattr(store, "model_fingerprint", lambda options: "another-model")
    vectors, counts = _embed(SOFA_SENTENCES, folder, tmp_path, "other")
    assert counts.get("sentences_embedded") == len(SOFA_SENTENCES) and not counts.get("sentences_reused")
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors.values())  # embedded, not the stored 0.5s
    assert sorted(os.listdir(folder)) == sorted([model_fingerprint(EmbedOptions()), "another-model"])


def test_an_unreadable_store_file_is_skipped_counted_and_its_sentences_embedded_again(tmp_path):
    folder = tmp_path / "store"
    model_dir = folder / model_fingerprint(EmbedOptions())
    _fake_store_file(model_dir, SOFA_SENTENCES[:2], 0.25)
    (model_dir / "embeddings-damaged.parquet").write_bytes(b"garbage!")
    vectors, counts = _embed(SOFA_SENTENCES, folder, tmp_path, "again")
    assert counts.get("unreadable_files") == 1
    assert counts.get("sentences_reused") == 2 and counts.get("sentences_embedded") == len(SOFA_SENTENCES) - 2
    assert all((vectors[stable_id(t)] == 0.25).all() for t in SOFA_SENTENCES[:2])  # read from the store


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
    monkeypatch.undo()
    assert {b: model_fingerprint(o) for b, o in options.items()} == before


@pytest.mark.slow
def test_a_build_with_another_k_reuses_the_store_and_writes_what_a_build_without_it_writes(tmp_path):
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
