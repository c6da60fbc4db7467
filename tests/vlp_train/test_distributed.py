"""DDP on two gloo processes: every rank stops an epoch together when one runs out of batches;
train() itself, mixed schedule, resumed exactly; gradient accumulation with one all-reduce a step."""
import json
import os
import socket
import sys
import time
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp_train.config import load_config
from vlp_train.distributed import Distributed, leave_together, setup_distributed, shut_down, synchronised
from vlp_train.pretrained import EXPORT_FOLDER

from .conftest import TINY_MODEL, write_shards


def _rank(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        control = dist.new_group(backend="gloo")
        batches = [f"r{rank}b{i}" for i in range(3 if rank == 0 else 2)]  # rank 1 runs out first
        results[rank] = list(synchronised(iter(batches), Distributed(rank, 2, rank, control)))
    finally:
        dist.destroy_process_group()


def test_ranks_stop_together_when_one_runs_out():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
        assert dict(results) == {0: ["r0b0", "r0b1"], 1: ["r1b0", "r1b1"]}


def _rank_then_exit(rank: int, fn, *args):
    """fn(rank, *args), then the rank's process ends without the interpreter's exit. torch itself keeps
    references to the default group once a DistributedDataParallel model or torch.distributed.nn's
    all_gather used it (destroy_process_group does not release them), so that group's gloo threads
    outlive every teardown, and one still releasing a collective's tensors (under the GIL) once the
    interpreter exits aborts the rank (SIGABRT) after its work was done and written. The product's
    own groups are asserted gone by its tests (distributed.shut_down); an error in fn still fails the
    rank as before (torch's spawn reports it)."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_ranks(fn, *args, timeout: float = 150):
    """fn(rank, port, *args) in two processes; fails (rather than hangs) past `timeout` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(_rank_then_exit, args=(fn, port, *args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the ranks ran past {timeout} s")


def _ddp_runs(rank: int, port: int, shards: str, folder: str):
    """As torchrun would start it: a whole run, then one killed after step 5 and resumed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks on a shared machine
    from vlp_train.train import train
    common = ["run.device=cpu", "objectives.schedule=mixed", "optim.max_steps=8", "optim.epochs=4",
              "data.batch_size=8", "run.log_every=1"]
    try:
        whole = load_config("debug", TINY_MODEL + common)  # debug: model.feature_dim=0, dropout 0.1
        whole.data.shards, whole.run.output = shards, os.path.join(folder, "whole")
        assert train(whole)["steps"] == 8
        # every rank leaves the run after the main rank's final evaluation and export
        assert os.path.isfile(os.path.join(whole.run.output, EXPORT_FOLDER, "config.json"))
        broken = load_config("debug", TINY_MODEL + common + ["run.save_every=3", "run.stop_after=5"])
        broken.data.shards, broken.run.output = shards, os.path.join(folder, "broken")
        assert train(broken)["stopped"]
        resumed = load_config("debug")
        resumed.run.output = broken.run.output
        assert train(resumed, resume=True)["steps"] == 8
    finally:
        shut_down()  # as the CLI ends a command


def _losses(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # a replayed step: the later row wins


def test_ddp_mixed_schedule_trains_and_resumes_like_an_uninterrupted_run(tmp_path):
    """Two gloo ranks through train(): a mixed batch (every task in one DDP forward), the feature
    size and tag vocabulary read on every rank (no tag_vocab.json: a scan), and a resumed run that
    matches the whole one, which needs rank 1's own RNG state back (its dropout reaches rank 0's
    losses through the averaged gradients)."""
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)  # 2 training shards: 1 per rank
    os.remove(tmp_path / "c" / "tag_vocab.json")
    _run_ranks(_ddp_runs, shards, str(tmp_path))
    whole, broken = _losses(tmp_path / "whole"), _losses(tmp_path / "broken")
    assert sorted(whole) == sorted(broken) == list(range(1, 9))
    for step in range(1, 9):
        assert broken[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), step
    saved = torch.load(tmp_path / "broken" / "checkpoints" / "step-00000003.pt", weights_only=True)
    assert len(saved["rank_rng"]) == 2
    assert not torch.equal(saved["rank_rng"][0]["torch"], saved["rank_rng"][1]["torch"])  # seed + rank


def _accumulation_runs(rank: int, port: int, shards: str, folder: str):
    """optim.grad_accum=2 under DDP: as train() runs it (gradients kept local on the first
    micro-batch of a step), then with an all-reduce after every micro-batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel as DDP

    from vlp_train.train import train
    real_no_sync, entered = DDP.no_sync, []

    def counted_no_sync(self):
        entered.append(1)
        return real_no_sync(self)

    common = ["run.device=cpu", "optim.grad_accum=2", "optim.max_steps=4", "optim.epochs=4", "data.batch_size=4",
              "run.log_every=1", "model.dropout=0.0"]
    try:
        for name, no_sync in (("local", counted_no_sync), ("every", lambda self: nullcontext())):
            DDP.no_sync = no_sync
            cfg = load_config("debug", TINY_MODEL + common)
            cfg.data.shards, cfg.run.output = shards, os.path.join(folder, name)
            assert train(cfg)["steps"] == 4
        with open(os.path.join(folder, f"no_sync-{rank}.txt"), "w") as f:
            f.write(str(len(entered)))
    finally:
        DDP.no_sync = real_no_sync
        shut_down()


def test_gradient_accumulation_all_reduces_once_a_step_with_the_same_result(tmp_path):
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)
    _run_ranks(_accumulation_runs, shards, str(tmp_path))
    for rank in (0, 1):  # 4 steps of 2 micro-batches: the first of each kept local
        assert (tmp_path / f"no_sync-{rank}.txt").read_text() == "4"
    local, every = _losses(tmp_path / "local"), _losses(tmp_path / "every")
    assert sorted(local) == sorted(every) == [1, 2, 3, 4]
    for step in local:
        assert local[step] == pytest.approx(every[step], rel=1e-5, abs=1e-6), step


def test_a_checkpoint_gives_each_rank_its_own_rng_state():
    """(A checkpoint of an earlier version, with one pickled RNG state, is refused on load:
    tests/vlp_train/test_reliability.py.)"""
    from vlp_train import checkpoint
    assert checkpoint.rng_of_rank({"rank_rng": ["r0", "r1"]}, 1) == "r1"
    assert checkpoint.rng_of_rank({"rank_rng": ["r0"]}, 1) is None  # saved by fewer ranks


def _one_shard_two_ranks(rank: int, port: int, shards: str, folder: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from vlp_train.train import train
    cfg = load_config("debug", TINY_MODEL + ["run.device=cpu", "data.eval_shards=" + shards])
    cfg.data.shards, cfg.run.output = shards, os.path.join(folder, "run")
    try:
        train(cfg)
    except ValueError as err:
        with open(os.path.join(folder, f"error-{rank}.txt"), "w") as f:
            f.write(str(err))
    finally:
        shut_down()


def test_too_few_shards_for_the_ranks_stop_at_start_instead_of_hanging(tmp_path):
    """One shard, two ranks: rank 1 would get no data and every epoch would end at once, for ever
    (the run sat at step 0). Both ranks stop at start, saying the rule and the counts."""
    shards = write_shards(str(tmp_path / "c"), n_images=16, per_shard=16)
    _run_ranks(_one_shard_two_ranks, shards, str(tmp_path), timeout=120)
    for rank in range(2):
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert "1 training shard(s) for 2 rank(s)" in message and "at least 2 shards" in message


def _one_rank_hangs(rank: int, port: int, folder: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:
            time.sleep(8)  # hangs past rank 0's timeout
        try:
            list(synchronised(iter(["b0", "b1"]), Distributed(rank, 2, rank, None, timeout_s=2)))
            outcome = "finished"
        except RuntimeError as err:
            outcome = str(err)
        with open(os.path.join(folder, f"rank-{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


def test_a_rank_that_does_not_arrive_is_named_by_the_others(tmp_path):
    """Rank 1 hangs: rank 0 gives up after run.dist_timeout_s (2 s here), naming rank 1."""
    _run_ranks(_one_rank_hangs, str(tmp_path), timeout=60)
    message = (tmp_path / "rank-0.txt").read_text()
    assert message.startswith("rank 0, before the next batch") and "Ranks 1 failed" in message, message


def _main_rank_evaluates_long(rank: int, port: int, folder: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist_info = setup_distributed("cpu", timeout_s=1)  # run.dist_timeout_s=1
    groups = [weakref.ref(group) for group in (dist.group.WORLD, dist_info.end_group)]
    try:
        # a second run in the process (VLMo's stages) reuses the end group: no second day-long wait to make one
        assert setup_distributed("cpu", timeout_s=1).end_group is dist_info.end_group
        if rank == 0:
            time.sleep(4)  # the main rank's last evaluation and export, past run.dist_timeout_s
        leave_together(dist_info)
    finally:
        shut_down()  # as the CLI ends a command
    with open(os.path.join(folder, f"rank-{rank}.txt"), "w") as f:
        f.write(f"left, {sum(group() is not None for group in groups)} group(s) alive")


def test_the_ranks_wait_for_the_main_ranks_last_evaluation_past_the_step_timeout(tmp_path):
    """A final evaluation longer than run.dist_timeout_s (1 s here) does not fail the other ranks. The
    command's end then ends every group (their gloo threads joined before the interpreter's exit,
    where a thread still at work aborts the process: see distributed.shut_down)."""
    _run_ranks(_main_rank_evaluates_long, str(tmp_path), timeout=60)
    assert [(tmp_path / f"rank-{rank}.txt").read_text() for rank in range(2)] == ["left, 0 group(s) alive"] * 2
