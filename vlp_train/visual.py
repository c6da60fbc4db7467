"""Visual inputs of the models: region features with their boxes."""
from __future__ import annotations

from torch import nn


class RegionEmbedding(nn.Module):
    """Linear(feature) + Linear(5-d location) + modality (token type 1) embedding, layer-normed."""

    def __init__(self, feature_dim: int, cfg, token_type: nn.Embedding):
        super().__init__()
        self.feature = nn.Linear(feature_dim, cfg.hidden_size)
        self.location = nn.Linear(5, cfg.hidden_size)
        self.token_type = token_type  # shared with the text embeddings: row 1 = the region modality
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, features, locations):
        x = self.feature(features) + self.location(locations) + self.token_type.weight[1]
        return self.dropout(self.LayerNorm(x))
