"""`vlp-data build-retrieval` end to end (retrievals only): outputs against schemas/, determinism,
reruns, bad input, and the Dataflow dry run."""
import glob
import json
import os

import pytest
from click.testing import CliRunner

import schemas
from pipelines.cli import main

from .conftest import SOFA_SENTENCES, write_jsonl

DETECTIONS = [
    {"image_id": "living-room.jpg", "width": 640, "height": 480,
     "boxes": [[0, 0, 300, 400], [200, 100, 600, 450]], "labels": ["woman", "sofa"], "scores": [0.8, 0.9]},
    {"image_id": "road.jpg", "width": 800, "height": 600,
     "boxes": [[10, 10, 400, 500], [50, 50, 300, 300]], "labels": ["motorcycle", "person"], "scores": [0.95, 0.7]},
    {"image_id": "kitchen.jpg", "width": 500, "height": 500, "boxes": [[0, 0, 100, 100]], "labels": ["cat"], "scores": [0.9]},
]


@pytest.fixture
def inputs(tmp_path):
    dets = write_jsonl(tmp_path / "detections.jsonl", DETECTIONS + ['{"image_id": "bad.jpg", "width": 1'])
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(SOFA_SENTENCES + ["", SOFA_SENTENCES[0]]) + "\n", encoding="utf-8")
    return dets, str(text)


def build(dets, text, out, *extra):
    result = CliRunner().invoke(main, ["build-retrieval", "--detections", dets, "--text", text, "--output", str(out),
                                       "--k", "3", "--no-shards", *extra])
    return result


def rows(out, name, schema):
    files = sorted(glob.glob(f"{out}/{name}/*.parquet"))
    assert files, f"no {name} files"
    return [r for f in files for r in schemas.read_table(f, schema).to_pylist()]


def file_bytes(out):
    return {os.path.relpath(p, out): open(p, "rb").read()
            for p in sorted(glob.glob(f"{out}/**/*", recursive=True)) if os.path.isfile(p)}


def test_build_retrieval_end_to_end(inputs, tmp_path):
    dets, text = inputs
    out = tmp_path / "out"
    result = build(dets, text, out)
    assert result.exit_code == 0, result.output
    assert "images: 4 in, 3 out" in result.output and "rejected: 1" in result.output
    assert "text: 8 lines read, dropped: duplicate 1, empty 1" in result.output
    assert "time per stage" in result.output and "embed" in result.output

    retrievals = rows(out, "retrievals", schemas.RETRIEVALS)
    by_image = {}
    for r in retrievals:
        by_image.setdefault(r["image_id"], []).append(r)
    assert sorted(by_image) == ["kitchen.jpg", "living-room.jpg", "road.jpg"]
    for hits in by_image.values():
        assert [h["rank"] for h in sorted(hits, key=lambda h: h["rank"])] == [0, 1, 2]
        scores = [h["score"] for h in sorted(hits, key=lambda h: h["rank"])]
        assert scores == sorted(scores, reverse=True)
    # each image's query: its tags in the query's order (schemas.corpus.tag_query), on every row
    assert {(r["image_id"], r["query"]) for r in retrievals} == {
        ("living-room.jpg", "sofa woman"), ("road.jpg", "motorcycle person"), ("kitchen.jpg", "cat")}
    best = {img: min(hits, key=lambda h: h["rank"])["sentence"] for img, hits in by_image.items()}
    assert best["living-room.jpg"] == SOFA_SENTENCES[0]
    assert best["road.jpg"] == SOFA_SENTENCES[4]
    assert best["kitchen.jpg"] == SOFA_SENTENCES[3]

    sentences = rows(out, "sentences", schemas.SENTENCES)
    assert sorted(s["text"] for s in sentences) == sorted(SOFA_SENTENCES)  # duplicate and empty line dropped
    assert {r["sentence_id"]: r["sentence"] for r in retrievals}.items() <= {s["sentence_id"]: s["text"] for s in sentences}.items()

    stats = json.loads((out / "stats.json").read_text())
    assert stats["images_valid"] == 3 and stats["sentences"] == 6 and stats["retrievals"] == 9
    assert stats["text"] == {"lines": 8, "dropped_empty": 1, "dropped_duplicate": 1}
    (rejected,) = [json.loads(line) for line in open(out / "rejected" / "build" / "rejected-00000-of-00001.jsonl")]
    assert rejected["source"] == f"{dets}:4" and rejected["reason"].startswith("malformed JSON")


def test_same_output_with_two_workers_and_on_rerun(inputs, tmp_path):
    dets, _ = inputs
    # Enough text for several embedding groups and batches (--batch-size 4: groups of 16), so
    # the two workers really split the work differently from one.
    from gensim.test.utils import datapath
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        pieces = (p.strip() + "." for line in f for p in line.split(". ") if 20 < len(p) < 300)
        lee = sorted(set(p for _, p in zip(range(60), pieces)))
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(SOFA_SENTENCES + lee) + "\n", encoding="utf-8")
    text = str(text)
    one, two = tmp_path / "one", tmp_path / "two"
    assert build(dets, text, one, "--batch-size", "4").exit_code == 0
    first = file_bytes(one)
    assert json.loads((one / "stats.json").read_text())["sentences"] == len(SOFA_SENTENCES) + len(lee)
    assert len(lee) > 50
    stale = one / "retrievals" / "retrievals-00007-of-00009.parquet"
    stale.write_bytes(b"left over from an older run")
    assert build(dets, text, one, "--batch-size", "4").exit_code == 0
    assert file_bytes(one) == first  # identical rows and files; the stale file is gone
    result = build(dets, text, two, "--batch-size", "4", "--direct_num_workers=2",
                   "--direct_running_mode=multi_processing")
    assert result.exit_code == 0, result.output
    assert file_bytes(two) == first
    # the corpus in 7 shards (66 sentences, 10 a shard), searched shard by shard and merged
    sharded = tmp_path / "sharded"
    result = build(dets, text, sharded, "--batch-size", "4", "--corpus-shard-rows", "10")
    assert result.exit_code == 0, result.output
    assert file_bytes(sharded) == first


def test_empty_corpus_fails_clearly_and_keeps_the_previous_output(inputs, tmp_path):
    dets, text = inputs
    out = tmp_path / "out"
    assert build(dets, text, out).exit_code == 0
    before = file_bytes(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = build(dets, str(empty), out)
    assert result.exit_code == 1
    assert "zero valid sentences" in result.output
    assert file_bytes(out) == before


def test_zero_valid_images_fails_clearly(tmp_path, inputs):
    _, text = inputs
    dets = write_jsonl(tmp_path / "bad.jsonl", ['{"image_id": "x.jpg"}', "not json"])
    result = build(dets, text, tmp_path / "out")
    assert result.exit_code == 1
    assert "zero valid images" in result.output


def test_shards_need_features(inputs, tmp_path):
    dets, text = inputs
    result = CliRunner().invoke(main, ["build-retrieval", "--detections", dets, "--text", text,
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "have no region features" in result.output and "--no-shards" in result.output


DATAFLOW = ["--runner", "DataflowRunner", "--project", "example-project", "--region", "us-central1",
            "--temp_location", "gs://example-bucket/tmp"]


def test_dataflow_dry_run_builds_offline():
    result = build("gs://example-bucket/d.jsonl", "gs://example-bucket/t.txt", "gs://example-bucket/vlp-out",
                   *DATAFLOW, "--dry_run=True")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output
    # the default backend follows the CPU that builds the options; the workers' CPUs are unknown here
    assert "remote runner: embedding with --sbert-backend onnx (exact)" in result.output


def test_the_flex_template_entry_point_builds_its_job_in_a_dry_run():
    """deploy/flex_main.py as the template launcher runs it (parameters as --name=value, no
    --runner): the job is built and validated for Dataflow, and the launcher would not wait."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    args = ["--detections=gs://example-bucket/d.jsonl", "--text=gs://example-bucket/t.txt",
            "--output=gs://example-bucket/vlp-out", "--project=example-project", "--region=us-central1",
            "--temp_location=gs://example-bucket/tmp", "--dry_run=True"]
    done = subprocess.run([sys.executable, str(root / "deploy" / "flex_main.py"), *args], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: the job was built and validated" in done.stdout
    from deploy.flex_main import launcher_args
    assert launcher_args(args)[:2] == ["build-retrieval", "--no-wait"] and "--runner=DataflowRunner" in launcher_args(args)
    assert "--runner=DataflowRunner" not in launcher_args(["--runner=FnApiRunner"])


@pytest.mark.parametrize("flag, value", [("--output", "vlp-out"), ("--text", "corpus.txt"),
                                         ("--detections", "gs://b/d.jsonl,local-detections.jsonl")])
def test_a_local_path_with_a_remote_runner_fails_in_one_line(flag, value):
    paths = {"--detections": "gs://b/d.jsonl", "--text": "gs://b/t.txt", "--output": "gs://b/out", flag: value}
    result = build(paths["--detections"], paths["--text"], paths["--output"], *DATAFLOW, "--dry_run=True")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert f"{flag} '{value.split(',')[-1]}' is a path on this machine, but --runner DataflowRunner" in line


def test_ivf_index_and_a_given_sbert_folder(inputs, tmp_path):
    """--index ivf probing every list is exact (so is ivfpq here: every candidate re-scored);
    --sbert-model takes a sentence-transformers folder."""
    from pipelines.encoding import default_sbert_path
    dets, text = inputs
    out = tmp_path / "ivf"
    result = build(dets, text, out, "--index", "ivf", "--nlist", "2", "--nprobe", "2",
                   "--sbert-model", default_sbert_path(), "--batch-size", "2")
    assert result.exit_code == 0, result.output
    best = {r["image_id"]: r["sentence"] for r in rows(out, "retrievals", schemas.RETRIEVALS) if r["rank"] == 0}
    assert best["living-room.jpg"] == SOFA_SENTENCES[0] and best["road.jpg"] == SOFA_SENTENCES[4]
    pq = tmp_path / "ivfpq"
    result = build(dets, text, pq, "--index", "ivfpq", "--pq-bytes", "8", "--corpus-shard-rows", "2", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert rows(pq, "retrievals", schemas.RETRIEVALS) == rows(out, "retrievals", schemas.RETRIEVALS)
    assert not (pq / ".staging").exists()  # the shards and index files were staging's, never published
    missing = build(dets, text, tmp_path / "x", "--sbert-model", str(tmp_path / "no-such-model"))
    assert missing.exit_code != 0 and "no-such-model" in missing.output
