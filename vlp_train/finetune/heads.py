"""Task heads: small modules over the pre-trained model's states, one kind per task shape.

- `ClassifierHead` over [CLS] (VQA, easy-vqa, SNLI-VE) or over both [CLS] states of an image
  pair concatenated (NLVR2's pair model): Linear -> LayerNorm -> GELU -> Linear, as UNITER and
  VLMo fine-tune (hidden = task.head_hidden_scale x the model's hidden size).
- `RegionScoreHead`: a score per region state (RefCOCO+: the region the expression names).
- retrieval scores a pair with the pre-trained model's own ITM head (no new head).
"""
from __future__ import annotations

import torch
from torch import nn

from vlp_train.pretrained import init_like_bert


class ClassifierHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, labels: int, eps: float = 1e-12):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden, eps=eps), nn.GELU(),
                                 nn.Linear(hidden, labels))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


class RegionScoreHead(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps),
                                 nn.Linear(hidden, 1))

    def forward(self, region_states: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """[B, R, D] -> [B, R] scores, padding at -inf."""
        return self.mlp(region_states).squeeze(-1).masked_fill(~region_mask, float("-inf"))


def init_head(head: nn.Module, std: float) -> nn.Module:
    """BERT's initialisation for a new head (the rule the pre-trained model's own modules follow)."""
    init_like_bert(head, std)
    return head
