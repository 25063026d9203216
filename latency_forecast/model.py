"""The recurrent forecaster: LSTM or GRU over a window of features, plus a per-service embedding."""

from __future__ import annotations

import torch
from torch import nn

from latency_forecast.config import ModelConfig


class LatencyForecaster(nn.Module):
    """Predicts one service's standardised log p99 latency ``horizon`` minutes ahead.

    The service embedding joins the last hidden state at the head: two services with the same
    CPU and topology can live at 40 ms and 300 ms, and the head must know which one it sees.
    """

    def __init__(self, n_features: int, n_services: int, config: ModelConfig):
        super().__init__()
        recurrent = {"lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        self.rnn = recurrent(
            input_size=n_features,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.embedding = nn.Embedding(n_services, config.service_embedding_dim) if config.service_embedding_dim else None
        head_inputs = config.hidden_size + config.service_embedding_dim
        self.head = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(head_inputs, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, 1),
        )

    def forward(self, windows: torch.Tensor, service_codes: torch.Tensor) -> torch.Tensor:
        """``windows`` (batch, sequence_length, n_features), ``service_codes`` (batch,) -> (batch,)."""
        output, _ = self.rnn(windows)
        last = output[:, -1]
        if self.embedding is not None:
            last = torch.cat([last, self.embedding(service_codes)], dim=-1)
        return self.head(last).squeeze(-1)
