"""Fine-tuning on two gloo ranks: a split that does not divide over the ranks' batches gives every
rank the same steps (the smallest share's batches), so their collectives pair up; retrieval's ITC
gathers its features over the ranks; an image file that cannot be decoded is left out by every
rank alike, before the examples are shared out."""
import io
import json
import os
import re
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from ..test_distributed import _run_ranks
from .test_harness import TINY, write_karpathy


def _finetune_rank(rank: int, port: int, folder: str, detections: str):
    """As torchrun starts `vlp-train finetune` on each rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks on a shared machine
    from click.testing import CliRunner

    from vlp_train.cli import main
    # 7 captions, the 2 of the undecodable image left out: 5 over 2 ranks, shares of 3 and 2, in batches
    # of 2: 2 batches and 1 (one rank's extra batch dropped)
    overrides = TINY + ["model.arch=vlmo", "model.vl_layers=1", "model.visual=both", "model.image_size=32",
                        "model.patch_size=8", "data.batch_size=2", "data.max_examples=7", "data.eval_split=test",
                        "optim.epochs=3", "run.device=cpu", "run.dist_timeout_s=30", "run.save_every=2"]
    try:
        result = CliRunner().invoke(main, ["finetune", "--task", "retrieval", "--data", folder, "--detections",
                                           detections, "--images", os.path.join(folder, "images"),
                                           "--output", os.path.join(folder, "ft")]
                                    + [arg for key in overrides for arg in ("--set", key)])
        assert result.exit_code == 0, result.output
        with open(os.path.join(folder, f"rank-{rank}.json"), "w") as f:
            json.dump({"steps": int(re.search(r"(\d+) steps ->", result.output).group(1)),
                       # the main rank writes metrics.json after its last evaluation: every rank leaves after it
                       "main_rank_done": os.path.exists(os.path.join(folder, "ft", "metrics.json")),
                       # the command ends the process group (left to the interpreter's exit, gloo can abort it)
                       "group_alive": dist.is_initialized()}, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _image_check_rank(rank: int, port: int, folder: str):
    """Rank 1's own check would find every file damaged (as a transient read error on one rank
    made it before); the ranks still agree, on rank 0's answer, and rank 1 reads no file. Then
    rank 0 cannot read a file: both ranks stop, rank 1 with rank 0's message (no wait for a result).
    Then every rank ends the process group as the CLI ends a command, on error too (shut_down)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from vlp_train.distributed import setup_distributed, shut_down
    from vlp_train.finetune import pixels

    dist_info = setup_distributed("cpu", timeout_s=30)
    checked = []
    real_check = pixels.image_problem

    def check(path):
        checked.append(os.path.basename(path))
        return "rank 1's own answer" if rank == 1 else real_check(path)
    pixels.image_problem = check
    outcome = {}
    try:
        images = pixels.ImageFolder(os.path.join(folder, "images"))
        outcome["damaged"] = images.damaged(images.files, "test", dist_info)
        outcome["checked"] = sorted(checked)
        if rank == 0:
            pixels.open = lambda path, *args: (_ for _ in ()).throw(OSError(5, "Input/output error", path))
        try:
            images.damaged(images.files, "test", dist_info)
        except (OSError, RuntimeError) as err:
            outcome["error"] = f"{type(err).__name__}: {err}"
    finally:
        groups = [weakref.ref(group) for group in (dist.group.WORLD, dist_info.end_group)]
        shut_down()
        outcome["groups_left"] = sum(group() is not None for group in groups)
        with open(os.path.join(folder, f"rank-{rank}.json"), "w") as f:
            json.dump(outcome, f)


def test_the_ranks_take_the_main_ranks_image_check(tmp_path):
    """SplitData's image check runs on rank 0 and its answer goes to every rank: before, each rank
    checked every file itself, and a rank-local difference (a read error on one rank) made the
    ranks keep different examples and hang at their first collective of different step counts."""
    (tmp_path / "images").mkdir()
    good, cut = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good, "PNG")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(cut, "JPEG")
    (tmp_path / "images" / "a.png").write_bytes(good.getvalue())
    (tmp_path / "images" / "b.jpg").write_bytes(cut.getvalue()[:-10])
    _run_ranks(_image_check_rank, str(tmp_path), timeout=120)
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert list(results[0]["damaged"]) == ["b.jpg"] and results[1]["damaged"] == results[0]["damaged"]
    assert results[0]["checked"] == ["a.png", "b.jpg"] and results[1]["checked"] == []  # each file read once
    path = re.escape(os.path.join(str(tmp_path), "images")) + r"/(a\.png|b\.jpg)"  # the first file walked
    assert re.fullmatch(f"OSError: --images {path}: the image file cannot be read \\(Input/output error\\): "
                        "not a damaged image, so the run stops rather than leave it out", results[0]["error"])
    assert re.match(f"RuntimeError: rank 1, test: checking image files: the main rank failed: OSError: --images "
                    f"{path}: the image file cannot be read", results[1]["error"])
    # every group gone with its gloo threads before the interpreter's exit: a group left alive (held by
    # vlp_train.distributed, or by the ranks' Distributed) kept its threads into the exit, where one still
    # releasing the broadcast's tensors aborted the rank (SIGABRT, "terminate called without an active
    # exception": this test failed so in 3 of 65 runs on a busy 2-core machine)
    assert [r["groups_left"] for r in results] == [0, 0]


@pytest.mark.slow
def test_uneven_split_gives_every_rank_the_same_steps(tmp_path):
    """Before: each rank counted its own share's batches (2 and 1 an epoch here), so the ranks'
    step counts differed and a collective waited for a rank that had finished (a hang, here the
    30 s timeout). The model sees the images' pixels too; image 1000's JPEG is cut short (before,
    the batch that decoded it stopped the run)."""
    detections = write_karpathy(tmp_path)
    rng = np.random.default_rng(1)
    (tmp_path / "images" / "flickr30k-images").mkdir(parents=True)
    for i in range(8):
        encoded = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(encoded, "JPEG")
        (tmp_path / "images" / "flickr30k-images" / f"{1000 + i}.jpg").write_bytes(
            encoded.getvalue()[:-100] if i == 0 else encoded.getvalue())
    _run_ranks(_finetune_rank, str(tmp_path), detections, timeout=240)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) == {
            "steps": 3, "main_rank_done": True, "group_alive": False}
    rows = [json.loads(line) for line in open(tmp_path / "ft" / "log.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert sum("eval" in r for r in rows) == 3  # once an epoch
    assert json.load(open(tmp_path / "ft" / "best" / "task.json"))["dual_encoder"] is True
