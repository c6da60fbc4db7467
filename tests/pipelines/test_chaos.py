"""A short chaos run (issue 17): a build SIGKILLed at random points (in the pipeline's writes and
inside the publish swap), then rerun: the output folder is always entirely one run's, and while a
swap is unfinished a reader's check_published refuses it. VLP_CHAOS_SEED picks other points."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import build
from schemas.corpus import STAGING, HalfPublishedError, check_published

from .conftest import SOFA_SENTENCES, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("chaos_launch.py")
SEED = int(os.environ.get("VLP_CHAOS_SEED", "17"))
DETECTIONS = [{"image_id": f"{label}.jpg", "width": 100, "height": 100, "boxes": [[0, 0, 50, 50]], "labels": [label],
               "scores": [0.9], "features": [[0.1 * n, 0.2, 0.3, 0.4]]}
              for n, label in enumerate(("sofa", "motorcycle", "cat"))]


def run(out, text, k, kill=None, shards=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VLP_KILL_AT", None)
    if kill:
        env["VLP_KILL_AT"] = "%s:%d" % kill
    return subprocess.run([sys.executable, str(LAUNCH), "build-retrieval", "--detections", str(out.parent / "d.jsonl"),
                           "--text", str(text), "--output", str(out), "--k", str(k), *([] if shards else ["--no-shards"])],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def corpus(out) -> dict:
    """Every published file's bytes (the staging folder is not the corpus)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*"))
            if p.is_file() and STAGING not in p.relative_to(out).parts}


@pytest.mark.slow
@pytest.mark.parametrize("shards", [False, True], ids=["retrievals-only", "shards"])
def test_a_build_killed_anywhere_leaves_one_runs_output(tmp_path, shards):
    """Retrievals only, and with shards (the shard writer's files, shards/ and the manifest swapped)."""
    write_jsonl(tmp_path / "d.jsonl", DETECTIONS)
    text_a, text_b = tmp_path / "a.txt", tmp_path / "b.txt"
    text_a.write_text("\n".join(SOFA_SENTENCES) + "\n")
    text_b.write_text("\n".join(SOFA_SENTENCES + ["A dog runs on the beach."]) + "\n")
    runs = {"A": (text_a, 1, None, shards), "B": (text_b, 2, None, shards)}  # different sentences, retrievals and stats
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert run(out, *runs["A"]).returncode == 0
    expected = {"A": corpus(out)}
    shutil.copytree(out, ref)
    done = run(ref, *runs["B"])  # over A's output, as the chaos runs are: the same moves
    assert done.returncode == 0, done.stderr
    expected["B"] = corpus(ref)
    renames, replaces = map(int, re.search(r"MOVES rename=(\d+) replace=(\d+)", done.stderr).groups())

    rng = random.Random(SEED)
    kills = [("rename", rng.randint(1, renames)), ("replace", rng.randint(1, replaces)),
             ("replace", rng.randint(1, replaces))]
    for i, kill in enumerate(kills):
        name = "AB"[i % 2 == 0]
        killed = run(out, *runs[name][:2], kill=kill, shards=shards)
        assert killed.returncode == -signal.SIGKILL, (kill, killed.stderr[-2000:])
        try:
            check_published(out)
            # the first replace puts the journal in place: from the second on, a kill is inside the swap
            assert kill[0] == "rename" or kill[1] == 1, f"killed at {kill} inside the swap, yet readable"
        except HalfPublishedError:  # killed inside the swap: readers refuse it until it is finished
            assert kill[0] == "replace"
            build.finish_publish(str(out))  # what the next run (or `vlp-data finish-publish`) does first
        assert corpus(out) in (expected["A"], expected["B"]), f"killed at {kill}: a mix of two runs"
    rerun = run(out, *runs["B"])
    assert rerun.returncode == 0, rerun.stderr
    assert corpus(out) == expected["B"]
