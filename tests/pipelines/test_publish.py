"""Publishing a staged run: whole-entry replacement per command, and a crash part way through
the swap finished by the next run (never a mix of two runs)."""
import json
import os

import pytest
from click.testing import CliRunner

from pipelines import build
from pipelines.cli import main

from . import objectstore
from .conftest import SOFA_SENTENCES, write_jsonl


def tree(root):
    """{relative path: content} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path).read()
    return out


def write(root, files):
    for rel, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(content)


BUILD_REJECTED = "rejected/build/rejected-00000-of-00001.jsonl"
DETECT_REJECTED = "rejected/detect/rejected-00000-of-00001.jsonl"
OLD = {"shards/corpus-000000.tar": "old0", "shards/corpus-000001.tar": "old1", "links/links.parquet": "old",
       "stats.json": "old", BUILD_REJECTED: "old", "rejected/rejected.jsonl": "an earlier version's",
       "detections/d.parquet": "det", DETECT_REJECTED: "det-rejected", "notes.txt": "the user's own file"}
NEW = {"shards/corpus-000000.tar": "new0", "stats.json": "new", BUILD_REJECTED: "new"}
# The new run wrote no links (e.g. --no-shards into a folder that had them): the old links go.
EXPECTED = {"shards/corpus-000000.tar": "new0", "stats.json": "new", BUILD_REJECTED: "new",
            "detections/d.parquet": "det", DETECT_REJECTED: "det-rejected", "notes.txt": "the user's own file"}


def staged_run(tmp_path):
    out = str(tmp_path / "out")
    write(out, OLD)
    write(build.staging_dir(out), NEW)
    return out


def test_publish_replaces_only_this_commands_entries(tmp_path):
    out = staged_run(tmp_path)
    build.publish(out, build.BUILD_ENTRIES)
    assert tree(out) == EXPECTED


@pytest.mark.parametrize("crash_after", range(0, 7))
def test_a_crash_during_the_swap_is_finished_by_the_next_run(tmp_path, monkeypatch, crash_after):
    out = staged_run(tmp_path)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        if len(calls) == crash_after:
            raise KeyboardInterrupt("killed")
        calls.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(build.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        build.publish(out, build.BUILD_ENTRIES)
    monkeypatch.setattr(build.os, "replace", real_replace)
    assert tree(out) != EXPECTED  # interrupted part way
    build.clear_staging(out)  # what the next run does first
    # the first rename puts the journal in place: killed before it, the swap never began and the
    # output is still wholly the earlier run's; after it, the next run finishes the swap
    assert tree(out) == (OLD if crash_after == 0 else EXPECTED)


def test_a_run_that_never_finished_leaves_the_output_alone(tmp_path):
    out = staged_run(tmp_path)  # staged files but no publish marker: the run itself died
    build.clear_staging(out)
    assert tree(out) == OLD


PARTIAL = "links/links-00000-of-00001.parquet.tmp-" + "0123456789abcdef" * 2  # a write that died before its rename


def test_a_partial_file_of_an_interrupted_write_is_not_published(tmp_path):
    out = staged_run(tmp_path)
    write(build.staging_dir(out), {PARTIAL: "half"})
    build.publish(out, build.BUILD_ENTRIES)
    assert tree(out) == EXPECTED


@pytest.fixture
def store():
    objectstore.OBJECTS.clear()
    yield "objstore://bucket/out"
    objectstore.OBJECTS.clear()


def test_on_an_object_store_an_unfinished_run_is_cleared(store):
    """`exists` is false for a folder there, and deleting a folder name deletes nothing."""
    for rel, content in OLD.items():
        objectstore.put(f"{store}/{rel}", content.encode())
    for rel, content in NEW.items():
        objectstore.put(f"{build.staging_dir(store)}/{rel}", content.encode())
    build.clear_staging(store)
    assert objectstore.names(store + "/") == sorted(OLD)  # the staged files are gone, OUT untouched


def test_on_an_object_store_publish_moves_this_runs_files_only(store):
    for rel, content in OLD.items():
        objectstore.put(f"{store}/{rel}", content.encode())
    for rel, content in {**NEW, PARTIAL: "half"}.items():
        objectstore.put(f"{build.staging_dir(store)}/{rel}", content.encode())
    build.publish(store, build.BUILD_ENTRIES)
    assert {rel: objectstore.OBJECTS[f"{store}/{rel}"].decode() for rel in objectstore.names(store + "/")} == EXPECTED


def test_detect_and_build_share_an_output_folder(tmp_path):
    """`build-retrieval --detections OUT/detections/...` into OUT keeps the detections it read."""
    out = tmp_path / "out"
    dets = write_jsonl(tmp_path / "d.jsonl", [
        {"image_id": "a.jpg", "width": 10, "height": 10, "boxes": [[0, 0, 5, 5]], "labels": ["sofa"], "scores": [0.9]}])
    os.makedirs(out / "detections")
    os.replace(dets, out / "detections" / "d.jsonl")
    (out / build.OUTPUT_MARKER).write_text("")  # as `vlp-data detect` leaves it
    text = tmp_path / "t.txt"
    text.write_text("\n".join(SOFA_SENTENCES) + "\n")
    result = CliRunner().invoke(main, ["build-retrieval", "--detections", str(out / "detections" / "*.jsonl"),
                                       "--text", str(text), "--output", str(out), "--no-shards", "--k", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == [build.OUTPUT_MARKER, "detections", "rejected", "retrievals", "sentences", "stats.json"]
    assert os.listdir(out / "detections") == ["d.jsonl"]


def test_images_without_tags_fail_the_run_clearly(tmp_path):
    dets = write_jsonl(tmp_path / "d.jsonl", [
        {"image_id": "empty.jpg", "width": 10, "height": 10, "boxes": [], "labels": [], "scores": []}])
    text = tmp_path / "t.txt"
    text.write_text("\n".join(SOFA_SENTENCES) + "\n")
    result = CliRunner().invoke(main, ["build-retrieval", "--detections", dets, "--text", str(text),
                                       "--output", str(tmp_path / "out"), "--no-shards"])
    assert result.exit_code == 1
    assert "got a retrieval" in result.output and "Traceback" not in result.output
    assert not os.path.exists(tmp_path / "out" / "retrievals")


@pytest.mark.parametrize("crash_after", range(0, 6))  # 3 old objects deleted, then 3 moved
def test_on_an_object_store_a_crash_during_the_swap_is_refused_by_readers_and_finished(store, monkeypatch, crash_after):
    """Killed after `crash_after` objects were deleted or moved: readers refuse the folder (the
    journal), the next run finishes the swap."""
    from apache_beam.io.filesystems import FileSystems

    from schemas.corpus import HalfPublishedError, check_published
    for rel, content in OLD.items():
        objectstore.put(f"{store}/{rel}", content.encode())
    for rel, content in NEW.items():
        objectstore.put(f"{build.staging_dir(store)}/{rel}", content.encode())
    changes = []

    class Flaky(dict):
        def _step(self, key):
            if key.startswith(store + "/") and not key.endswith(build.PUBLISH_JOURNAL) and ".tmp-" not in key:
                if len(changes) == crash_after:
                    raise KeyboardInterrupt("killed")
                changes.append(key)

        def pop(self, key, *default):
            self._step(key)
            return super().pop(key, *default)

        def __delitem__(self, key):
            self._step(key)
            super().__delitem__(key)

    monkeypatch.setattr(objectstore, "OBJECTS", Flaky(objectstore.OBJECTS))
    with pytest.raises(KeyboardInterrupt):
        build.publish(store, build.BUILD_ENTRIES)
    monkeypatch.setattr(objectstore, "OBJECTS", dict(objectstore.OBJECTS))
    with pytest.raises(HalfPublishedError):
        check_published(store, exists=FileSystems.exists)
    build.clear_staging(store)  # what the next run does first
    check_published(store, exists=FileSystems.exists)
    assert {rel: objectstore.OBJECTS[f"{store}/{rel}"].decode() for rel in objectstore.names(store + "/")} == EXPECTED


# The publish is the pipeline's own last step (any runner, a flex template included, ends with the
# output in place): it runs after every other step, and a retried step neither redoes nor undoes it.


@pytest.mark.parametrize("shards", [False, True], ids=["retrievals-only", "shards"])
def test_the_publish_step_runs_after_every_other_step(tmp_path, shards):
    from pipelines.options import BuildOptions
    options = BuildOptions(output=str(tmp_path / "out"), detections=str(tmp_path / "d.jsonl"),
                           text=str(tmp_path / "t.txt"), shards=shards)
    pipeline = build.build_retrieval_pipeline(options, [])
    (final,) = build.final_outputs(pipeline)  # every other step's output is read by something
    assert final.producer.full_label == "Publish"
    upstream, todo = set(), [final.producer]
    while todo:  # every step the publish step waits for, through main and side inputs
        node = todo.pop()
        if node.full_label in upstream:
            continue
        upstream.add(node.full_label)
        todo += [p for p in [pc.producer for pc in node.inputs] + [side.pvalue.producer for side in node.side_inputs]
                 if p is not None]  # the pipeline's start has no producer
    writes = {label for label in upstream if label.rsplit("/", 1)[-1].startswith("Write")}
    expected = {"WriteSentences", "WriteRetrievals", "WriteRejected", "WriteStats"} | (
        {"WriteShards", "WriteManifest", "WriteLinks", "WriteTagVocab"} if shards else set())
    assert expected <= {label.split("/")[0] for label in writes}
    from pipelines.options import DetectOptions
    detect = build.build_detect_pipeline(str(tmp_path / "*.jpg"), str(tmp_path / "det"), DetectOptions(), [])
    assert [pc.producer.full_label for pc in build.final_outputs(detect)] == ["Publish"]


def test_a_retried_publish_step_finishes_or_leaves_the_published_run(tmp_path, monkeypatch):
    out = staged_run(tmp_path)
    build._publish_step(1, out, build.BUILD_ENTRIES)
    assert tree(out) == EXPECTED
    build._publish_step(1, out, build.BUILD_ENTRIES)  # a retry after it had published: nothing to do
    assert tree(out) == EXPECTED

    out = staged_run(tmp_path / "again")
    real_replace, calls = os.replace, []

    def killed_after_the_shards_moved(source, target):
        if len(calls) == 4:  # the journal; old links and shards parked; the new shards moved in
            raise KeyboardInterrupt("the worker died")
        calls.append(target)
        real_replace(source, target)

    monkeypatch.setattr(build.os, "replace", killed_after_the_shards_moved)
    with pytest.raises(KeyboardInterrupt):
        build._publish_step(1, out, build.BUILD_ENTRIES)
    monkeypatch.setattr(build.os, "replace", real_replace)
    build._publish_step(1, out, build.BUILD_ENTRIES)  # the retry finishes the recorded swap
    assert tree(out) == EXPECTED


def test_the_publish_step_refuses_an_unusable_run_and_moves_nothing(tmp_path):
    from pipelines.options import BuildOptions
    out = staged_run(tmp_path)
    stats = {"sentences": 0, "images_valid": 3, "images_retrieved": 0, "rejected": {}}
    write(build.staging_dir(out), {"stats.json": json.dumps(stats)})
    check = build.BuildCheck(BuildOptions(output=out, text="corpus.txt"))
    with pytest.raises(build.BuildCheckError, match="the text corpus gave zero valid sentences"):
        build._publish_step(1, out, build.BUILD_ENTRIES, check=check)
    assert tree(out) == {**OLD, **{f"{build.STAGING}/{rel}": c for rel, c in NEW.items()},
                         f"{build.STAGING}/stats.json": json.dumps(stats)}
