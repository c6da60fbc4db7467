"""torch.compile of the training step (the CUDA default), in both scopes: no graph breaks (a
break is where a host sync such as `.item()` would sit), a fixed set of graphs for batches of
varying size, text length, labelled-position count and region count (scope `step`: one per task
and ITM weighting; scope `layers`: one layer graph shared by every layer, per grad mode), and the
same losses and ITM weights as the eager step."""
import copy
from contextlib import nullcontext

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import BertTokenizerFast

from bench import train as bench_train
from vlp_train.config import load_config
from vlp_train.data import CorpusStream, enabled_tasks, expand_shards, load_tag_vocab
from schemas.corpus import bundled_minilm_path
from vlp_train.backbone import call_layer
from vlp_train.compile import LAYER_GRAPHS, STEP_GRAPHS, step_module_for
from vlp_train.families import build_model
from vlp_train.families import clean_pair_match_probability as match_probability
from vlp_train.families.single_stream import FAMILY
from vlp_train.masking import BatchBuilder
from vlp_train.step import Pretraining, compute_loss, to_device

from .conftest import TINY_MODEL

FEATURE_DIM = 16


def varied_batches(tmp_path, monkeypatch, cfg, tasks):
    """18 round-robin batches of the benchmark's synthetic corpus (36 regions, 5 sentences of
    12-20 words, 2-4 linked phrases), regions padded as for any compiled step: text lengths and
    labelled-position counts vary from batch to batch as in training, and the last 3 batches have
    fewer images (an epoch's last batch)."""
    monkeypatch.setattr(bench_train, "DATA", str(tmp_path / "data"))
    urls = expand_shards(bench_train.synthetic_corpus(images=120, regions=36, feature_dim=FEATURE_DIM, per_shard=60))
    tags = load_tag_vocab(None, urls)
    builder = BatchBuilder(BertTokenizerFast.from_pretrained(bundled_minilm_path()), {t: i for i, t in enumerate(tags)},
                           cfg.model.max_text_len, cfg.model.max_regions, cfg.objectives, pad_regions=True)
    batches = []
    for images, count in ((12, 15), (7, 3)):
        stream = CorpusStream(urls, builder, images, tasks, "round_robin", 32, seed=len(batches), resampled=True)
        stream.set_position(0, 0, max_batches=count)
        batches += [to_device(batch["views"], torch.device("cpu")) for batch in stream]  # float16 features widened
    return batches, tags


@pytest.mark.parametrize("scope", ["step", "layers"])
def test_compiled_step_has_no_graph_breaks_a_fixed_set_of_graphs_and_eager_losses(scope, tmp_path, monkeypatch):
    cfg = load_config("debug", TINY_MODEL + ["model.dropout=0.0", "objectives.schedule=round_robin"])
    tasks = enabled_tasks(cfg.objectives)
    batches, tags = varied_batches(tmp_path, monkeypatch, cfg, tasks)
    sizes = {(task, tuple(v["input_ids"].shape), tuple(v["mlm_positions"].shape), tuple(v["features"].shape))
             for views in batches for task, v in views.items()}
    assert len(sizes) > 2 * len(tasks)  # the sizes vary: dynamo must cope without piling up graphs

    torch.manual_seed(0)
    eager = Pretraining(build_model(cfg.model, FEATURE_DIM, tags), FAMILY).train()
    torch._dynamo.reset()
    counters.clear()
    # aot_eager: dynamo's capture and AOTAutograd as inductor would see them, without its codegen;
    # a copy of the model, since the layers scope changes how the model calls its layers
    compiled = step_module_for(copy.deepcopy(eager.model), FAMILY, scope, backend="aot_eager")
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
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled graphs ({scope}): {graphs}")  # docs/benchmarks.md cites it (pytest -s)
    if scope == "step":
        # one graph per task and weighting for every size; without the dims marked dynamic dynamo
        # compiles a static graph first, then dynamic ones as each size changes (13 here, not 5)
        assert graphs == len(tasks) + len(weighted) <= STEP_GRAPHS <= torch._dynamo.config.recompile_limit, graphs
    else:
        # the 2 layers share one graph for training and one for the no-grad ITM-weight forward
        # (dropout off, as evaluation); unmarked: a static graph first, then re-specialised ones (5 here, tried)
        assert graphs == 2 <= LAYER_GRAPHS <= torch._dynamo.config.recompile_limit, graphs


@pytest.mark.parametrize("scope", ["step", "layers"])
def test_compiled_training_runs_batches_of_every_size_without_recompiling(scope, tmp_path, monkeypatch):
    """model.compile=on through train(), with inductor (what CUDA runs by default): batches whose
    text length, size (an epoch's last batch) and region count (shards of 4-region and 7-region
    images) vary. For a step compiled whole the loader pads regions to max_regions: with the text
    and region lengths both symbolic, inductor fails to lower the attention (ValueRangeError),
    which a plain torch.compile reaches as soon as a batch has another region count. A compiled
    layer sees one sequence length (text + regions) and needs no padding."""
    from vlp_train.train import train

    monkeypatch.setattr(bench_train, "DATA", str(tmp_path / "data"))
    globs = [bench_train.synthetic_corpus(images=images, regions=regions, feature_dim=FEATURE_DIM, per_shard=20)
             for images, regions in ((40, 4), (36, 7))]
    cfg = load_config("debug", TINY_MODEL + [
        "model.compile=on", f"model.compile_scope={scope}", "model.max_regions=8", "data.batch_size=16",
        "data.shuffle_buffer=1",
        "data.eval_shards=" + globs[0].replace("*", "corpus-000000"), "objectives.region_phrase=false",
        "objectives.image_sentence=false", "optim.epochs=2", "run.log_every=1", "run.eval_batches=1"])
    cfg.data.shards, cfg.run.output = ",".join(globs), str(tmp_path / "run")
    torch._dynamo.reset()
    counters.clear()
    summary = train(cfg)
    assert summary["steps"] == 10  # 76 images: 4 batches of 16 and one of 12, twice
    # region-tag only: one graph for every batch (layers: and one for the evaluation forward)
    assert counters["stats"]["unique_graphs"] == (1 if scope == "step" else 2)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("scope", [None, "step", "layers"])
def test_itm_weights_are_deterministic_with_dropout_on(scope, tmp_path, monkeypatch):
    """The ITM weight is the model's judgement of a pair: made with dropout off although the step
    runs in training mode, so the same batch gets the same weights twice, those of the model in
    eval mode, and the model is left in training mode. Compiled, the mode switch costs no graph
    break; in the layer scope the weight forward and evaluation share one no-grad graph."""
    cfg = load_config("debug", TINY_MODEL + ["model.dropout=0.5", "objectives.schedule=round_robin"])
    batches, tags = varied_batches(tmp_path, monkeypatch, cfg, enabled_tasks(cfg.objectives))
    weighed = [next(views for views in batches if task in views) for task in ("rp", "is")]
    torch.manual_seed(0)
    model = build_model(cfg.model, FEATURE_DIM, tags).train()
    torch._dynamo.reset()
    counters.clear()
    step_module = step_module_for(model, FAMILY, scope, backend="aot_eager") if scope else Pretraining(model, FAMILY)
    for views in weighed:
        _, _, first = compute_loss(step_module, views, True, nullcontext())
        _, _, second = compute_loss(step_module, views, True, nullcontext())
        assert model.training and all(m.training for m in model.modules())
        (task, view), = views.items()
        eager = copy.deepcopy(model).eval()
        eager.set_layer_call(call_layer)
        reference = match_probability(eager, view)
        torch.testing.assert_close(first[task], second[task], rtol=0, atol=0)
        torch.testing.assert_close(first[task], reference, rtol=1e-5, atol=1e-6)
    if scope:
        model.eval()
        with torch.no_grad():  # as evaluation calls the model
            model(*(weighed[1]["is"][k] for k in ("input_ids", "text_mask", "features", "locations", "region_mask")))
        assert not counters["graph_break"], dict(counters["graph_break"])
        # step: rp and is, each weighted; layers: training, and the no-grad eval graph evaluation shares
        assert counters["stats"]["unique_graphs"] == 2


def test_compile_settings_are_checked_and_the_layer_scope_keeps_the_state_dict():
    from vlp_train.compile import compile_scope
    cpu = torch.device("cpu")
    assert compile_scope(load_config("debug", ["model.compile=auto"]), cpu) is None  # auto: CUDA only
    assert compile_scope(load_config("debug", ["model.compile=on"]), cpu) == "layers"  # the default scope
    assert compile_scope(load_config("debug", ["model.compile=on", "model.compile_scope=step"]), cpu) == "step"
    with pytest.raises(ValueError, match="model.compile_scope='model'"):
        compile_scope(load_config("debug", ["model.compile=on", "model.compile_scope=model"]), cpu)
    with pytest.raises(ValueError, match="model.compile='yes'"):
        compile_scope(load_config("debug", ["model.compile=yes"]), cpu)
    cfg = load_config("debug", TINY_MODEL)
    model = build_model(cfg.model, FEATURE_DIM, ["a", "b", "c"])
    keys = list(model.state_dict())
    step_module_for(model, FAMILY, "layers", backend="aot_eager")
    assert list(model.state_dict()) == keys  # checkpoints and the HF export read the same names
    assert callable(model.bert.call_layer) and model.bert.call_layer is not call_layer


def seeded_loss(step_module, views, seed: int):
    """compute_loss with the RNG at `seed` (and restored after): the same hard negatives for the
    compiled and the eager step."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return compute_loss(step_module, views, False, nullcontext())


@pytest.mark.parametrize("stage", ["vision", "language", "vl"])
def test_vlmos_layers_compile_as_two_regions_whatever_the_mode_and_expert(stage, tmp_path):
    """VLMo under model.compile_scope=layers: the shared attention and the FFN are the compiled
    regions (an expert is a module argument of the FFN's graph, so the mode and the layer pick an
    expert without a graph of their own). Each stage's batches (vision: images alone through the
    V-FFN; language: text alone through the L-FFN; vl: image alone, text alone and the pair, whose
    bottom layers split it between the L- and V-FFN and whose top layer takes the VL-FFN) give the
    eager losses, over batches of varying size and length, and the graphs are 2 for training and 2
    for the no-grad, dropout-off forward of evaluation and the ITM weights."""
    from vlp_train.components import build_run
    from vlp_train.families import family_of

    from .conftest import write_shards
    from .test_vlmo import write_sentences

    corpus = str(tmp_path / "c")
    shards = write_shards(corpus, n_images=28, per_shard=14)
    write_sentences(corpus, [f"sentence {i} about a {'small ' * (i % 4)}cat on a mat." for i in range(40)])
    cfg = load_config("vlmo-debug", TINY_MODEL + ["model.dropout=0.0", "model.vl_layers=1", "data.batch_size=6",
                                                  f"model.stage={stage}", "run.eval_batches=1"])
    cfg.data.shards, cfg.run.output = shards, str(tmp_path / "run")
    run = build_run(cfg)
    batches = [to_device(batch["views"], run.device) for _, batch in zip(range(4), run.dataset)]
    shapes = {tuple(v["input_ids" if stage == "language" else "features"].shape) for views in batches
              for v in views.values()}
    assert len(shapes) > 1  # the sizes vary: the dynamic dims must hold
    family = family_of("vlmo")
    eager = Pretraining(run.model, family).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = step_module_for(copy.deepcopy(run.model), family, "layers", backend="aot_eager")
    assert compiled.model.call_layer is not call_layer

    for n, views in enumerate(batches):
        loss_c, named_c, _ = seeded_loss(compiled, views, n)
        loss_e, named_e, _ = seeded_loss(eager, views, n)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        assert named_c.keys() == named_e.keys()
        for name in named_e:
            torch.testing.assert_close(named_c[name], named_e[name], rtol=1e-5, atol=1e-5)
        loss_c.backward()
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # attention and FFN
    for module in (compiled, eager):
        module.eval()
    with torch.no_grad():  # as evaluation and the ITM weights run it
        loss_c, _, _ = seeded_loss(compiled, batches[0], 0)
        loss_e, _, _ = seeded_loss(eager, batches[0], 0)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    assert counters["stats"]["unique_graphs"] == 4 <= LAYER_GRAPHS <= torch._dynamo.config.recompile_limit


def test_vlmaes_layers_fusion_included_compile_to_a_graph_per_kind_and_grad_mode():
    """VLMAE under model.compile_scope=layers: the image encoder's, the momentum copies', the text
    encoder's, the decoder's and the fusion layers (with their cross-attention to the image) go
    through the compiled call and give the eager pair losses over batches of varying size, region
    count and text length; a graph per layer kind (ViT, momentum ViT, BERT, momentum BERT,
    decoder, fusion: 6) for training, and at most as many for the no-grad eval-mode forward."""
    from transformers import BertConfig

    from vlp_train.config import ObjectiveConfig
    from vlp_train.families import family_of
    from vlp_train.families.vlmae import PAIR_TASK, VLMAEModel

    from .test_vlmae import DIM, TAGS, grid_sample, view_of

    builder = BatchBuilder(BertTokenizerFast.from_pretrained(bundled_minilm_path()),
                           {t: i for i, t in enumerate(sorted(TAGS))}, 40, 36, ObjectiveConfig())
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = VLMAEModel(config, {"feature_dim": DIM, "tags": sorted(TAGS), "fusion_layers": 1, "vision": [2, 32, 2],
                                "decoder": [1, 16, 2]}).train()
    batches = []
    for n, (rows, regions) in enumerate([(4, 8), (5, 6), (3, 8)]):
        samples = [grid_sample(10 * n + i, [(i % regions, 0.8)] * (1 + (i + n) % 3), n=regions) for i in range(rows)]
        batches.append({PAIR_TASK: view_of(builder, samples, seed=n)})
    family = family_of("vlmae")
    eager = Pretraining(model, family)
    torch._dynamo.reset()
    counters.clear()
    compiled = step_module_for(copy.deepcopy(model), family, "layers", backend="aot_eager")

    for n, views in enumerate(batches):
        loss_c, named_c, _ = seeded_loss(compiled, views, n)
        loss_e, named_e, _ = seeded_loss(eager, views, n)
        for name in named_e:
            torch.testing.assert_close(named_c[name], named_e[name], rtol=1e-5, atol=1e-5)
        loss_c.backward()
        loss_e.backward()  # both models take the same momentum updates
    assert counters["stats"]["unique_graphs"] == 6, dict(counters["stats"])
    for module in (compiled, eager):
        module.eval()
    with torch.no_grad():
        torch.testing.assert_close(seeded_loss(compiled, batches[0], 0)[0], seeded_loss(eager, batches[0], 0)[0],
                                   rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 12 <= torch._dynamo.config.recompile_limit
