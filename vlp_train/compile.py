"""torch.compile of the training step: `model.compile` (auto = on CUDA only) and
`model.compile_scope` (layers: one compiled transformer layer serving all; step: the whole step)."""
from __future__ import annotations

import torch
from torch import nn

from vlp_train.backbone import call_layer
from vlp_train.config import COMPILE_MODES, COMPILE_SCOPES, TrainConfig
from vlp_train.masking import FIXED_SHAPE_FIELDS
from vlp_train.step import Pretraining


def compile_scope(cfg: TrainConfig, device: torch.device) -> str | None:
    """What torch.compile compiles in this run: None (eager), "layers" or "step"."""
    if cfg.model.compile not in COMPILE_MODES:
        raise ValueError(f"model.compile={cfg.model.compile!r}: expected one of {COMPILE_MODES}")
    if cfg.model.compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"model.compile_scope={cfg.model.compile_scope!r}: expected one of {COMPILE_SCOPES}")
    on = cfg.model.compile == "on" or (cfg.model.compile == "auto" and device.type == "cuda")
    return cfg.model.compile_scope if on else None


def step_module_for(model: nn.Module, family, scope: str | None, backend: str = "inductor") -> nn.Module:
    """The module the loop calls: `Pretraining(model)`, compiled as `scope` says (`layers`: the
    model's layer call becomes the compiled one, so evaluation, which calls the model, uses it too)."""
    step_module = Pretraining(model, family)
    if scope == "step":
        return CompiledStep(step_module, backend)
    if scope == "layers":
        model.set_layer_call(CompiledLayers(backend))
    return step_module


def allow_graphs(count: int) -> None:
    """Dynamo keeps at most `recompile_limit` graphs per function (default 8) and past it runs
    the function eagerly, with a log warning as the only sign."""
    import torch._dynamo  # here, not at module level: seconds of start-up that an eager run never needs
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, count)


# the layer's graphs: training, and one no-grad eval-mode graph (ITM weights, evaluation); VLMo: 4
# (its attention and FFN regions, each in both); a language stage after a vision one in one process
# (`--stage vision,language`) adds 2 more, the frozen attention's
LAYER_GRAPHS = 8
STEP_GRAPHS = 16  # the step's graphs: one per task set and weighting (round_robin 5, mixed 2), plus re-specialisation


class CompiledLayers:
    """Regional compilation (`model.compile_scope=layers`, the default): one torch.compile of
    `backbone.call_layer` serves every transformer layer, which all run the same code on parameters
    of the same shapes (dynamo lifts a layer's parameters into graph inputs, so the graph does not
    depend on which layer it is). A compile takes seconds, not the minutes per graph of the whole
    step (docs/benchmarks.md); the embeddings, heads and losses run eagerly: a small share of
    the FLOPs (the region embedding, MRFR and the vocabulary heads at the labelled positions).

    The batch and sequence dims (text + regions: one length) are marked dynamic before every call,
    so one graph serves every batch from the first (unmarked, dynamo compiles a static graph first,
    and its duck sizing ties a sequence length that equals another size to it); graphs: the
    training forward/backward, and one no-grad eval-mode forward that the ITM weights (dropout off)
    and evaluation share.

    VLMo's multiway layers (families/vlmo.py) call it for their two sub-layers, the shared attention
    and the expert FFN the mode picks (`backbone.BertAttention`, `backbone.FeedForward`): an expert
    is a module argument whose parameters dynamo lifts as inputs, so the mode and the layer choose
    an expert without a graph of their own, and the graphs are 2 for training (attention, FFN) and
    2 for the no-grad eval forward, whatever the mode (image, text, pair) or stage. VLMAE's layer
    kinds each take a graph per grad mode (`VLMAEModel.set_layer_call`)."""

    def __init__(self, backend: str = "inductor"):
        allow_graphs(LAYER_GRAPHS)
        self.compiled = torch.compile(call_layer, backend=backend)

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, *rest) -> torch.Tensor:
        """`layer(hidden, *rest)`, compiled. `rest`: attention masks [B, 1, 1, N] and the states a
        layer cross-attends to [B, M, W] (VLMAE's fusion layers), or nothing (VLMo's experts)."""
        for tensor in (hidden, *rest):
            if torch.is_tensor(tensor):
                for dim in _VARYING_DIMS.get(tensor.ndim, ()):
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return self.compiled(layer, hidden, *rest)


# what varies from batch to batch in a layer's tensors, by their rank: states [B, N, D] their batch
# and length, attention masks [B, 1, 1, N] their batch and the keys' length
_VARYING_DIMS = {3: (0, 1), 4: (0, 3)}


class CompiledStep(nn.Module):
    """torch.compile of the whole step module (`model.compile_scope=step`), told up front which
    sizes vary from batch to batch. One graph per set of tasks in a batch and ITM weighting
    (round_robin: 5, each task alone, rp and is also weighted; mixed: 2, all tasks, unweighted and
    weighted), each holding all the layers, heads and losses: more fusion than `CompiledLayers`,
    minutes of compilation per graph.

    The batch (dim 0 of every view field: an epoch's last batch is smaller) and the per-batch
    lengths (every other dim of the text and label fields) vary; the region count does not,
    since the loader pads regions to `max_regions` for a compiled step (`pad_regions`). Left to
    itself, dynamo compiles a graph for the first batch's sizes and recompiles a dynamic one when
    they change: two or more compiles per task and weighting, the first graph never serving
    again. Marked dynamic up front, one graph per task set and weighting serves every batch.

    The region count stays fixed because inductor (torch 2.13, CPU) fails to lower attention over
    a sequence of text + regions with both lengths symbolic (ValueRangeError in a stride check;
    tests/vlp_train/test_compile.py)."""

    def __init__(self, step_module: nn.Module, backend: str = "inductor"):
        super().__init__()
        allow_graphs(STEP_GRAPHS)
        self.compiled = torch.compile(step_module, backend=backend)

    def forward(self, views: dict, weighted: tuple = ()):
        for view in views.values():
            for name, value in view.items():
                if torch.is_tensor(value):
                    # every dim of a text or label field varies (p-MRTC's targets [B, P, T] too)
                    for dim in range(1 if name in FIXED_SHAPE_FIELDS else value.ndim):
                        torch._dynamo.maybe_mark_dynamic(value, dim)
        return self.compiled(views, weighted)


