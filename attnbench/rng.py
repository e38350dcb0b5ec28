"""Seeded randomness for implementations whose dropout draws from torch's global RNG."""

from __future__ import annotations

import contextlib

import torch

from attnbench.spec import Config


def dropout_rng(cfg: Config, device: torch.device):
    """A context in which the global RNG is seeded with cfg.dropout_seed (and restored after),
    so the same call drops the same entries; a no-op without dropout."""
    if cfg.dropout_p <= 0:
        return contextlib.nullcontext()
    return _fork_and_seed(cfg.dropout_seed, device)


@contextlib.contextmanager
def _fork_and_seed(seed: int, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
