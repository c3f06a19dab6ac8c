"""What LoRA is: a frozen linear layer plus a trainable low-rank update.

    h = W0 x + (alpha / r) * B A dropout(x)

W0 (d_out x d_in) is the pretrained weight and never changes. A (r x d_in) starts Kaiming-uniform,
B (d_out x r) starts at zero, so an untrained adapter changes nothing. Only r * (d_in + d_out)
numbers per layer are learned. After training, W0 + (alpha / r) * B A can be folded into one plain
weight (`merge`), so inference costs exactly what the original model costs.
(Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models".)
"""
import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """`base(x) + (alpha / r) * lora_B(lora_A(dropout(x)))`, with `base` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def delta_weight(self):
        """The update (alpha / r) * B @ A, shaped like base.weight."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge(self):
        """Fold the update into base.weight (once: a second call does nothing)."""
        if not self.merged:  # the base may be stored in bf16 (cast once for speed): round the update once
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True


def classifier_head(model):
    """The task head that is trained along with the adapters (`classifier`, or `score`)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name, getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no `classifier` or `score` head to train")


class TargetError(ValueError):
    """A --targets name that no nn.Linear of the model has; the message lists the names it has."""


def inject_lora(model, r, alpha, dropout=0.0, targets=("query", "value")):
    """Wrap every nn.Linear whose name ends in one of `targets` with LoRALinear, in place.

    Afterwards everything is frozen except the adapters and the classification head. Returns model.
    """
    targets = tuple(targets)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linear_names if n.split(".")[-1] in targets]
    missing = [t for t in targets if not any(n.split(".")[-1] == t for n in chosen)]
    if missing:
        existing = sorted({n.split(".")[-1] for n in linear_names})
        raise TargetError(f"unknown LoRA target(s) {', '.join(missing)}; "
                         f"this model's Linear layers are named: {', '.join(existing)}")
    model.requires_grad_(False)  # freeze all; the adapters made below are new, so they train
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    classifier_head(model)[1].requires_grad_(True)
    return model


def merge_lora(model):
    """Merge every adapter and put plain nn.Linear layers back. Returns model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)
    return model


def lora_state_dict(model):
    """Only the trained tensors (adapters + head): what a checkpoint needs to hold."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in model.state_dict().items() if n in trainable}


def largest_rank(model, r, max_trainable):
    """The largest rank whose trainable count (adapters + head) stays within max_trainable (0: none).

    The adapters of rank r hold r * sum(d_in + d_out) numbers: trainable = head + r * per_rank.
    """
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n)
    return max(0, (max_trainable - head) // (lora // r))


def parameter_table(model):
    """A small table of where the parameters are: frozen, LoRA, head, trainable in total."""
    head_name = classifier_head(model)[0]
    counts = {"frozen": 0, "LoRA (A and B)": 0, f"head ({head_name})": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            counts["frozen"] += p.numel()
        elif ".lora_" in name:
            counts["LoRA (A and B)"] += p.numel()
        else:
            counts[f"head ({head_name})"] += p.numel()
    trainable = sum(counts.values()) - counts["frozen"]
    total = sum(counts.values())
    rows = [*counts.items(), ("trainable in total", trainable), ("all parameters", total)]
    lines = [f"{'parameters':<22}{'count':>14}{'share':>9}"]
    lines += [f"{k:<22}{v:>14,}{v / total:>9.2%}" for k, v in rows]
    return "\n".join(lines)
