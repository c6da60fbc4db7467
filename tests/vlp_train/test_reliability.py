"""The trainer under damaged input and crashes: unreadable shards and members, absurd values that
make a loss non-finite, unreadable or crafted checkpoints, bad config values, too few shards for
the ranks; each a clear message or a counted skip, never a bare traceback or a hang."""
import json
import logging
import os

import pytest
import torch
from click.testing import CliRunner

from schemas.corpus import sample_key, sample_members, tar_bytes
from vlp_train import checkpoint
from vlp_train.cli import main
from vlp_train.config import load_config
from vlp_train.train import train

from .conftest import TINY_MODEL, make_sample, write_shards


def rows(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def config(shards, out, *overrides):
    cfg = load_config("debug", TINY_MODEL + ["data.batch_size=8", "run.log_every=1", "run.eval_batches=1", *overrides])
    cfg.data.shards, cfg.run.output = shards, str(out)
    return cfg


def shard_of(samples, path):
    members = []
    for meta, feats in sorted(samples, key=lambda mf: sample_key(mf[0]["image_id"])):
        members += sample_members(sample_key(meta["image_id"]), meta, feats)
    with open(path, "wb") as f:
        f.write(tar_bytes(members))


def samples(start, count, boxes=None):
    import random

    import numpy as np
    rng, prototypes = random.Random(start), np.random.default_rng(0).standard_normal((6, 16)) * 2
    out = [make_sample(i, rng, prototypes) for i in range(start, start + count)]
    if boxes is not None:
        for meta, _ in out:
            meta["boxes"] = boxes
    return out


def test_damaged_shards_are_skipped_counted_and_named(tmp_path, caplog):
    """A shard cut short, a zero-byte shard and a sample whose .npy header is garbage: the run
    trains on the rest, counts the losses as bad samples and names each shard."""
    shards = write_shards(str(tmp_path / "c"), n_images=64, per_shard=16)  # 4 shards, the last held out
    folder = os.path.dirname(shards)
    cut = os.path.join(folder, "corpus-000000.tar")
    data = open(cut, "rb").read()
    open(cut, "wb").write(data[: len(data) // 2 + 100])  # ends inside a member
    open(os.path.join(folder, "corpus-000001.tar"), "wb").close()  # zero bytes
    garbage = os.path.join(folder, "corpus-000002.tar")
    import tarfile
    with tarfile.open(garbage) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    name, npy = next((n, d) for n, d in members if n.endswith(".npy"))
    header_end = 10 + int.from_bytes(npy[8:10], "little")
    broken = npy[:10] + b"{'descr': '<f2', 'shape': (((" + b" " * (header_end - 10 - 29) + npy[header_end:]
    members = [(n, broken if n == name else d) for n, d in members]
    open(garbage, "wb").write(tar_bytes(members))
    cfg = config(shards, tmp_path / "run", "optim.epochs=1", "optim.max_steps=0")
    with caplog.at_level(logging.WARNING):
        summary = train(cfg)
    assert summary["steps"] >= 2 and summary["bad_samples"] >= 2  # the garbage .npy and the empty shard
    text = caplog.text
    assert "corpus-000000.tar" in text and "corpus-000001.tar" in text  # named, before and during training
    assert name.split(".")[0] in text  # the undecodable sample by its key
    assert "TokenError" in text or "SyntaxError" in text or "undecodable" in text


def test_a_run_whose_every_shard_is_bad_stops_with_one_message(tmp_path):
    folder = tmp_path / "c" / "shards"
    folder.mkdir(parents=True)
    for n in range(2):
        (folder / f"corpus-{n:06d}.tar").write_bytes(b"")
    result = CliRunner().invoke(main, ["run", "--shards", str(folder / "*.tar"), "--output", str(tmp_path / "run"),
                                       *sum((["--set", o] for o in TINY_MODEL), [])])
    assert result.exit_code == 1 and "holds a readable sample" in result.output, result.output


def test_a_non_finite_loss_skips_the_step_and_names_its_samples(tmp_path):
    """One image with a box of 1e30 (finite, absurd) makes its batches' loss non-finite: those steps
    are skipped (weights and optimizer moments untouched), logged with the batch's keys, and the run
    ends with finite weights and a finite checkpoint."""
    folder = tmp_path / "c" / "shards"
    folder.mkdir(parents=True)
    good = samples(0, 31)
    bad = samples(100, 1, boxes=[[0.0, 0.0, 1e30, 1e30], [0.0, 0.0, 10.0, 10.0]])
    shard_of(good + bad, folder / "corpus-000000.tar")
    shard_of(samples(200, 8), folder / "corpus-000001.tar")  # held out
    cfg = config(str(folder / "*.tar"), tmp_path / "run", "optim.epochs=2", "optim.max_steps=0")
    summary = train(cfg)
    assert summary["steps"] == 8
    skipped = [r for r in rows(cfg.run.output) if "skipped" in r]
    bad_key = sample_key(bad[0][0]["image_id"])
    assert len(skipped) == 2 and all(bad_key in r["keys"] for r in skipped)  # once an epoch
    losses = [r for r in rows(cfg.run.output) if "loss" in r]
    assert sum(r["skipped_steps"] for r in losses) == 2
    state = checkpoint.load(checkpoint.load_latest(os.path.join(cfg.run.output, "checkpoints"))[0])
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_non_finite_steps_in_a_row_stop_the_run_with_their_samples(tmp_path):
    folder = tmp_path / "c" / "shards"
    folder.mkdir(parents=True)
    shard_of(samples(0, 32, boxes=[[0.0, 0.0, 1e30, 1e30], [0.0, 0.0, 10.0, 10.0]]), folder / "corpus-000000.tar")
    shard_of(samples(200, 8), folder / "corpus-000001.tar")
    cfg = config(str(folder / "*.tar"), tmp_path / "run", "optim.epochs=2", "run.max_skipped_steps=2")
    with pytest.raises(RuntimeError, match=r"3 steps in a row .* non-finite") as err:
        train(cfg)
    assert any(sample_key(f"img{i:04d}.jpg") in str(err.value) for i in range(32))  # the skipped samples, named
    assert not os.path.exists(os.path.join(cfg.run.output, "checkpoints"))  # nothing saved


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, caplog):
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)
    cfg = config(shards, tmp_path / "run", "optim.epochs=4", "optim.max_steps=8", "run.save_every=2",
                 "run.stop_after=4")
    assert train(cfg)["stopped"]
    newest = os.path.join(cfg.run.output, "checkpoints", "step-00000004.pt")
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING):
        summary = train(load_config("debug", [f"run.output={cfg.run.output}"]), resume=True)
    assert summary["steps"] == 8
    assert "step-00000004.pt" in caplog.text and "step-00000002.pt" in caplog.text
    steps = [r["step"] for r in rows(cfg.run.output) if "loss" in r]
    assert steps == list(range(1, 9))  # the log reads as one run: steps 3-4 of the killed run dropped


def test_a_checkpoint_holding_other_objects_is_never_unpickled(tmp_path):
    import argparse
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"step": 1, "payload": argparse.Namespace(x=1)}, folder / "step-00000001.pt")  # any class: code could run
    with pytest.raises(ValueError, match="refusing to unpickle"):
        checkpoint.load_latest(str(folder))


def test_resuming_with_another_rank_layout_is_refused(tmp_path):
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)
    cfg = config(shards, tmp_path / "run", "optim.epochs=4", "optim.max_steps=8", "run.save_every=2", "run.stop_after=2")
    train(cfg)
    path = os.path.join(cfg.run.output, "checkpoints", "step-00000002.pt")
    state = torch.load(path, weights_only=True)
    state["position"]["world"] = 2  # as if saved by two ranks
    torch.save(state, path)
    with pytest.raises(ValueError, match="resume with as many processes"):
        train(load_config("debug", [f"run.output={cfg.run.output}"]), resume=True)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"), ("optim.grad_accum=0", "optim.grad_accum=0: must be >= 1"),
    ("run.log_every=0", "run.log_every=0: must be >= 1"), ("optim.warmup_ratio=5", "optim.warmup_ratio=5.0: must be in"),
    ("data.num_workers=-1", "data.num_workers=-1"), ("optim.lr=fast", "optim.lr=fast: expected a number"),
    ("model.init=/no/such/folder", "model.init /no/such/folder: no such folder"),
    ("data.tag_vocab=/no/tags.json", "data.tag_vocab=/no/tags.json: no such file"),
    ("run.device=gpu", "run.device='gpu': expected one of"), ("optim.lr=inf", "optim.lr=inf: must be a finite number")])
def test_bad_config_values_are_named_at_start(tmp_path, override, message):
    shards = write_shards(str(tmp_path / "c"), n_images=16, per_shard=16)
    result = CliRunner().invoke(main, ["run", "--shards", shards, "--output", str(tmp_path / "run"),
                                       *sum((["--set", o] for o in TINY_MODEL + [override]), [])])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output


def test_init_with_resume_and_a_stopped_run_as_init_are_explained(tmp_path):
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)
    cfg = config(shards, tmp_path / "stopped", "optim.max_steps=4", "run.save_every=2", "run.stop_after=2")
    train(cfg)
    runner = CliRunner()
    both = runner.invoke(main, ["run", "--output", str(tmp_path / "x"), "--init", "random", "--resume"])
    assert both.exit_code == 2 and "--init with --resume" in both.output
    stopped = runner.invoke(main, ["run", "--shards", shards, "--output", str(tmp_path / "y"), "--init", cfg.run.output])
    assert stopped.exit_code == 1 and "a run folder without an export" in stopped.output, stopped.output


def test_a_window_averages_each_named_loss_over_the_samples_that_have_it():
    """A batch where no sample had a loss (no linked region masked: rp/mrtc) adds nothing to the
    window's mean, instead of a 0 that reads as a perfect loss; a loss no batch had is left out."""
    from vlp_train.runlog import MetricsWindow
    window = MetricsWindow()
    window.add(torch.tensor(1.0), {"rp/mrtc": torch.tensor([6.0, 2.0]), "rt/mrc": torch.tensor([0.0, 0.0])}, 8, 0, [])
    window.add(torch.tensor(1.0), {"rp/mrtc": torch.tensor([0.0, 0.0]), "rt/mrc": torch.tensor([0.0, 0.0])}, 8, 0, [])
    window.end_step(1, torch.tensor(False))
    row = window.row()
    assert row["rp/mrtc"] == 3.0 and "rt/mrc" not in row and row["skipped_steps"] == 0


def test_killed_at_random_steps_and_resumed_each_time_ends_bit_for_bit_as_an_unbroken_run(tmp_path):
    """A soak: one run killed at three random steps (checkpoints every 2 steps, so a resume replays
    up to a step), resumed after each kill, ends with exactly the weights of a run never stopped."""
    import random
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)
    common = ["optim.epochs=5", "optim.max_steps=14", "run.save_every=2", "objectives.schedule=mixed"]
    train(config(shards, tmp_path / "whole", *common))
    kills = sorted(random.Random(7).sample(range(1, 14), 3))
    first = config(shards, tmp_path / "broken", *common, f"run.stop_after={kills[0]}")
    assert train(first)["stopped"]
    for kill in kills[1:] + [0]:  # 0: the last resume runs to the end
        summary = train(load_config("debug", [f"run.output={first.run.output}", f"run.stop_after={kill}"]), resume=True)
        assert summary["stopped"] == bool(kill)
    whole = checkpoint.load(checkpoint.load_latest(str(tmp_path / "whole" / "checkpoints"))[0])
    broken = checkpoint.load(checkpoint.load_latest(str(tmp_path / "broken" / "checkpoints"))[0])
    assert whole["step"] == broken["step"] == 14
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, broken["model"][name]), name


def test_a_half_published_corpus_is_refused(tmp_path):
    """A build killed inside its publish swap leaves new shards beside an old manifest: the trainer
    refuses the folder until the swap is finished (vlp-data finish-publish, or the next build)."""
    from schemas.corpus import PUBLISH_JOURNAL, STAGING, HalfPublishedError
    shards = write_shards(str(tmp_path / "c"), n_images=32, per_shard=16)
    (tmp_path / "c" / STAGING).mkdir()
    (tmp_path / "c" / STAGING / PUBLISH_JOURNAL).write_text("{}")
    with pytest.raises(HalfPublishedError, match="finish-publish"):
        train(config(shards, tmp_path / "run", "optim.max_steps=1"))


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_run_unless_overwrite(tmp_path):
    """Appending to an earlier run's log (and leaving its checkpoints to be resumed later) mixed two
    runs: refused; --overwrite removes that run's entries, and the user's own files stay."""
    shards = write_shards(str(tmp_path / "c"), n_images=32, per_shard=16)
    common = ["run", "--shards", shards, "--output", str(tmp_path / "run"), "--set", "optim.max_steps=2",
              "--set", "run.log_every=1", *sum((["--set", o] for o in TINY_MODEL), [])]
    runner = CliRunner()
    assert runner.invoke(main, common).exit_code == 0
    (tmp_path / "run" / "notes.txt").write_text("mine")
    refused = runner.invoke(main, common)
    assert refused.exit_code == 1 and "holds an earlier run" in refused.output and "--overwrite" in refused.output
    assert runner.invoke(main, common + ["--overwrite"]).exit_code == 0
    assert [r["step"] for r in rows(tmp_path / "run") if "loss" in r] == [1, 2]  # one run's rows
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    as_file = runner.invoke(main, common[:4] + [str(tmp_path / "file")] + common[5:])
    assert as_file.exit_code == 1 and "is a file" in as_file.output and "Traceback" not in as_file.output


def test_shards_of_another_feature_width_are_bad_samples_not_a_crash(tmp_path):
    """Shards of two corpora given together, 16-d and 24-d features: the model takes the first
    sample's width; the others are named, skipped and counted (the trainer died at batch 2 before)."""
    import numpy as np
    folder = tmp_path / "c" / "shards"
    folder.mkdir(parents=True)
    shard_of(samples(0, 16), folder / "corpus-000000.tar")
    wide = [(meta, np.random.default_rng(7).standard_normal((len(meta["boxes"]), 24)).astype(np.float16))
            for meta, _ in samples(300, 16)]
    shard_of(wide, folder / "corpus-000001.tar")
    shard_of(samples(200, 8), folder / "corpus-000002.tar")  # held out
    cfg = config(str(folder / "*.tar"), tmp_path / "run", "optim.epochs=1", "optim.max_steps=0",
                 "data.shuffle_buffer=1")
    summary = train(cfg)
    # the schedule counts the shards' 32 samples (4 batches): the 2 good batches are read twice
    assert summary["steps"] == 4 and summary["bad_samples"] == 32


def test_a_model_holding_inf_is_never_checkpointed(tmp_path):
    from vlp_train.families import build_model
    model = build_model(load_config("debug", TINY_MODEL).model, 16, ["a"])
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with torch.no_grad():
        model.itm[0].weight[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="inf or nan; no checkpoint written"):
        checkpoint.save(str(tmp_path), 3, model, optimizer, scheduler, {}, {})
    assert not os.listdir(tmp_path)


def test_an_init_folders_pickled_weights_are_read_without_running_code(tmp_path):
    """A pytorch_model.bin is read with weights_only=True: one holding any other object is refused."""
    import argparse

    from transformers import BertConfig, BertModel

    from vlp_train.backbone import read_weights
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    os.remove(tmp_path / "bert" / "model.safetensors")  # an older folder: PyTorch's pickle-based .bin only
    torch.save(BertModel(config).state_dict(), tmp_path / "bert" / "pytorch_model.bin")
    assert "embeddings.word_embeddings.weight" in read_weights(str(tmp_path / "bert"))
    torch.save({"weights": argparse.Namespace(x=1)}, tmp_path / "bert" / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        read_weights(str(tmp_path / "bert"))


@pytest.mark.slow
def test_sigkilled_at_random_points_and_resumed_ends_bit_for_bit_as_an_unbroken_run(tmp_path):
    """A soak with real kills: `vlp-train run` SIGKILLed three times at random points (after an
    optimizer step, inside a checkpoint write, inside a log write), resumed after each, ends with
    the weights of a run never stopped, bit for bit, and a log holding each step once."""
    import random
    import subprocess
    import sys
    from pathlib import Path
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)
    root = Path(__file__).resolve().parents[2]
    launch = Path(__file__).with_name("kill_launch.py")
    flags = ["--shards", shards, "--set", "optim.epochs=5", "--set", "optim.max_steps=14", "--set", "run.save_every=2",
             "--set", "objectives.schedule=mixed", "--set", "data.batch_size=8", "--set", "run.log_every=1",
             "--set", "run.eval_batches=1", *sum((["--set", o] for o in TINY_MODEL), [])]

    def run(out, *extra, kill=None):
        env = {**os.environ, "PYTHONPATH": str(root)}
        env.pop("VLP_KILL_AT", None)
        if kill:
            env["VLP_KILL_AT"] = kill
        return subprocess.run([sys.executable, str(launch), "run", "--output", str(out), *extra], env=env, cwd=root,
                              capture_output=True, text=True, timeout=300)

    assert run(tmp_path / "whole", *flags).returncode == 0
    rng = random.Random(int(os.environ.get("VLP_SOAK_SEED", "1")))  # 1: one resume lands on an epoch's end
    kills = [rng.choice([f"step:{rng.randint(3, 6)}", f"save:{rng.randint(2, 3)}", f"log:{rng.randint(4, 8)}"])
             for _ in range(3)]
    first = run(tmp_path / "broken", *flags, kill=kills[0])
    assert first.returncode == -9, (kills, first.stderr[-2000:])
    for kill in kills[1:] + [None]:
        resumed = run(tmp_path / "broken", "--resume", kill=kill)
        assert resumed.returncode in ((-9, 0) if kill else (0,)), (kills, kill, resumed.stderr[-2000:])
        if resumed.returncode == 0:  # (another VLP_SOAK_SEED may put a kill past the run's end)
            break
    whole = checkpoint.load(checkpoint.load_latest(str(tmp_path / "whole" / "checkpoints"))[0])
    broken = checkpoint.load(checkpoint.load_latest(str(tmp_path / "broken" / "checkpoints"))[0])
    assert whole["step"] == broken["step"] == 14, kills
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, broken["model"][name]), (kills, name)
    assert [r["step"] for r in rows(tmp_path / "broken") if "loss" in r] == list(range(1, 15)), kills
