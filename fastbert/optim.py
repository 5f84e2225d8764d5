"""Optimiser and learning-rate schedule shared by pretraining and fine-tuning (BERT's recipe)."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no weight decay on biases and LayerNorm weights, as in BERT."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-6,
                    capturable: bool = False):
    """AdamW, fused where torch has a fused kernel for the parameters' device.

    The fused kernel makes one pass over each tensor instead of ~10: on this project's 2-core CPU
    it cut the step of an 11M-parameter model from 267 ms to 72 ms (CUDA: one launch per group).
    ``capturable``: the step counter lives on the device, so the step can be captured in a CUDA graph.
    """
    groups = param_groups(model, weight_decay)
    devices = {p.device.type for g in groups for p in g["params"]}
    extra = {"capturable": True} if capturable else {}
    if len(devices) == 1 and devices <= {"cuda", "cpu"}:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True, **extra)
        except (RuntimeError, ValueError, TypeError):  # a torch without a fused kernel for this device/dtype
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **extra)


def warmup_linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak rate, then linear decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(optimizer, scheduler, params, max_grad_norm: float | None = None, scaler=None) -> None:
    """One update after backward: unscale (fp16), clip the global grad norm, step, advance the schedule
    and free the gradients. ``scaler`` is a GradScaler for fp16, None otherwise."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if max_grad_norm and max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
