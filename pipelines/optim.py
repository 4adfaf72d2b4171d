"""Optimisation settings as code: the learning-rate schedule and the optimizer a run's hyper-parameters name."""

from __future__ import annotations

import math

import torch

from .planning import ModelRun

__all__ = ["lr_at", "make_optimizer"]


def lr_at(base_lr: float, schedule: str, warmup_epochs: float, epochs: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate at global ``step``: linear warm-up, then constant or cosine decay to zero."""
    total = max(1, epochs * steps_per_epoch)
    warmup = round(warmup_epochs * steps_per_epoch)  # (truncated, 0.29 epochs of 100 steps were 28 steps)
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(run: ModelRun, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on one-dimensional parameters: biases, norm scales (and LeNet-5's
    paper-variant subsampling coefficients, one per map), whose decay only hurts."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    hyper = run.hyper
    groups = [{"params": decay, "weight_decay": hyper.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if hyper.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=hyper.lr)
    return torch.optim.SGD(groups, lr=hyper.lr, momentum=hyper.momentum, nesterov=hyper.momentum > 0)
