"""torch.compile of the training step (the CUDA default): no graph breaks (a break is where a
host sync such as `.item()` would sit), few enough graphs for batches of varying text length and
labelled-position count, and the same losses and ITM weights as the eager step."""
from contextlib import nullcontext

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import BertTokenizerFast

from vlp_train.config import load_config
from vlp_train.data import CorpusStream, enabled_tasks, expand_shards
from vlp_train.masking import BatchBuilder
from vlp_train.model import build_model, bundled_bert_path
from vlp_train.train import STEP_GRAPHS, Pretraining, compile_step, compute_loss, to_device

from .conftest import DIM, TAGS, TINY_MODEL, write_shards


def test_compiled_step_has_no_graph_breaks_few_graphs_and_eager_losses(tmp_path):
    cfg = load_config("debug", TINY_MODEL + ["model.dropout=0.0", "objectives.schedule=round_robin"])
    urls = expand_shards(write_shards(str(tmp_path / "c"), n_images=96, per_shard=48))
    builder = BatchBuilder(BertTokenizerFast.from_pretrained(bundled_bert_path()),
                           {t: i for i, t in enumerate(sorted(TAGS))}, cfg.model.max_text_len,
                           cfg.model.max_regions, cfg.objectives)
    tasks = enabled_tasks(cfg.objectives)
    stream = CorpusStream(urls, builder, 6, tasks, "round_robin", 16, seed=0, resampled=True)
    stream.set_position(0, 0, max_batches=18)
    batches = [to_device(batch["views"], torch.device("cpu")) for batch in stream]  # float16 features widened
    shapes = {(task, tuple(v["input_ids"].shape), tuple(v["mlm_positions"].shape))
              for views in batches for task, v in views.items()}
    assert len(shapes) > len(tasks) + 2  # the shapes vary: dynamo must cope without piling up graphs

    torch.manual_seed(0)
    eager = Pretraining(build_model(cfg.model, DIM, len(TAGS))).train()
    torch._dynamo.reset()
    counters.clear()
    # aot_eager: dynamo's capture and AOTAutograd as inductor would see them, without its codegen
    compile_step(eager)  # for its graph limit; the step itself is compiled with aot_eager below
    compiled = torch.compile(eager, backend="aot_eager")
    weighted = set()
    for n, views in enumerate(batches):
        weighting = n >= len(batches) // 3  # "epoch m" starts after a third of the batches
        loss_c, named_c, weights_c = compute_loss(compiled, views, weighting, nullcontext())
        loss_e, named_e, weights_e = compute_loss(eager, views, weighting, nullcontext())
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        assert named_c.keys() == named_e.keys() and weights_c.keys() == weights_e.keys()
        for task in weights_e:
            torch.testing.assert_close(weights_c[task], weights_e[task], rtol=1e-5, atol=1e-5)
        weighted |= set(weights_e)
        loss_c.backward()  # the backward graph is compiled too
    assert weighted == {"rp", "is"} & set(tasks)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    # at most a static and a dynamic graph per task and weighting, within the limit compile_step
    # sets: past it dynamo would run the step eagerly, with only a log warning
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled graphs: {graphs}")  # docs/benchmarks.md cites it (pytest -s)
    most = 2 * (len(tasks) + len(weighted))
    assert len(tasks) + len(weighted) <= graphs <= most <= STEP_GRAPHS <= torch._dynamo.config.recompile_limit, graphs
