"""Strict state-dict loading with messages that say what does not fit."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
    """load_state_dict(strict=True) with a message that lists the missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"{what} does not match {type(module).__name__}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(dict(state_dict), strict=True)
