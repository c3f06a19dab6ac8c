"""What LoRA is: a frozen linear layer plus a trainable low-rank update.

    h = W0 x + b + (alpha / r) * B A dropout(x)

W0 (d_out x d_in) and b are pretrained, frozen. A (r x d_in) starts Kaiming-uniform (as in loralib
and PEFT; the paper's is Gaussian), B (d_out x r) at zero, so an untrained adapter changes nothing;
a layer learns r * (d_in + d_out) numbers. The paper keeps alpha fixed as r changes, which reduces
retuning the rate; our default alpha = 2r keeps alpha / r at 2, so a new --r may need a new --lr.
Trained, W0 + (alpha / r) B A folds into one weight (`merge_lora`), as cheap as W0 (Hu et al. 2021).
"""
import re

import torch
from torch import nn


class TargetError(ValueError):
    """A --targets name that matches no adaptable nn.Linear, or a rank one of them cannot take."""


class LoRALinear(nn.Module):
    """`base(x) + (alpha / r) * lora_B(lora_A(dropout(x)))`, with `base` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)  # U(+-1/sqrt(d_in)): nn.Linear's
        nn.init.zeros_(self.lora_B.weight)  # so that the untrained update is zero

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def delta_weight(self):
        """The update (alpha / r) * B @ A, shaped like base.weight: W = base.weight + it."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)


def inject_lora(model, r, alpha, dropout=0.0, targets=None, skip=(), layer=LoRALinear):
    """Freeze the whole model, then wrap each target nn.Linear (target_paths) in a trainable
    `layer` (LoRALinear, or a subclass with another start), in place. `skip`: the paths of modules
    made for the task (the new head), never adapted. Returns the adapted paths."""
    paths = target_paths(model, targets, skip)
    model.requires_grad_(False)  # freeze all; the adapters made below are new, so they train
    for path in paths:
        parent, _, child = path.rpartition(".")
        adapted = layer(model.get_submodule(path), r, alpha, dropout)
        setattr(model.get_submodule(parent), child, adapted)
    return paths


# the default targets: each family's attention query and value (the first a model has), or its qkv
QUERY_VALUE = [("query", "value"), ("q_proj", "v_proj"), ("query_proj", "value_proj"),
               ("q_lin", "v_lin"), ("Wqkv",), ("qkv",)]


def target_paths(model, targets=None, skip=()):
    """The paths that `targets` name: dotted suffixes of module paths ("query",
    "attention.output.dense"), "all-linear" for every adaptable nn.Linear, or None: the first entry
    of QUERY_VALUE that the model has."""
    paths = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
             and not any(name == s or name.startswith(s + ".") for s in skip)]
    if targets is not None and "all-linear" in targets:
        return paths
    named = lambda path, t: path == t or path.endswith("." + t)  # noqa: E731
    has = lambda pair: all(any(named(p, t) for p in paths) for t in pair)  # noqa: E731
    targets = targets or next(filter(has, QUERY_VALUE), QUERY_VALUE[0])
    chosen = [p for p in paths if any(named(p, t) for t in targets)]
    missing = [t for t in targets if not any(named(p, t) for p in chosen)]
    if missing:  # name each layer's suffixes: the path after its layer number, and its last name
        known = {re.sub(r".*\.\d+\.", "", p) for p in paths} | {p.rsplit(".")[-1] for p in paths}
        raise TargetError(f"unknown LoRA target(s) {', '.join(missing)}; targets are dotted "
                          f"suffixes of this model's Linear layers: {', '.join(sorted(known))}, "
                          "or all-linear")
    return chosen


# --- operations: not needed to follow the method --------------------------------------------------
# The whole model merged; PiSSA, another start for A and B; what LoRA learned; the budget.

@torch.no_grad()
def merge_lora(model):
    """Each adapter folded into its weight, W0 + (alpha / r) B A, and a plain nn.Linear put back:
    the model costs what the base model costs, and loads with no code of ours. Returns it."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.base.weight += module.delta_weight().to(module.base.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base)
    return model


class PiSSALinear(LoRALinear):
    """LoRA started where W0 itself is largest (Meng et al., 2024, "PiSSA").

    By Eckart-Young, the best rank-r approximation of W0 = U S V^T is its top-r SVD. With
    s = alpha / r, B0 = U_r sqrt(S_r / s) and A0 = sqrt(S_r / s) V_r^T make s B0 A0 that
    approximation, and the residual W0 - s B0 A0 is frozen as the base: before training (no dropout,
    fp32) the model computes what the pretrained one does. Saved, the adapter is plain LoRA on the
    pretrained W0, of rank 2r with alpha 2 alpha: s (B A - B0 A0) = s [B, -B0] [A; A0].
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout=0.0):
        if r > min(base.in_features, base.out_features):
            raise TargetError(f"PiSSA rank r={r} is above the rank of a {base.out_features} x "
                              f"{base.in_features} weight; use a smaller --r")
        super().__init__(base, r, alpha, dropout)
        self.start_on_principal_directions()

    @torch.no_grad()
    def start_on_principal_directions(self):
        """PiSSA: B0 A0 from W0's top-r SVD (in fp32), and W0 - s B0 A0 as the base."""
        weight = self.base.weight
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = (S[:self.r] / self.scale).sqrt()
        self.lora_B.weight.copy_(U[:, :self.r] * root)
        self.lora_A.weight.copy_(root[:, None] * Vh[:self.r])
        # B0 and A0 are kept to save the adapter as plain LoRA (as_plain_lora)
        self.register_buffer("B0", self.lora_B.weight.detach().clone(), persistent=False)
        self.register_buffer("A0", self.lora_A.weight.detach().clone(), persistent=False)
        weight.copy_(weight.float() - self.scale * self.B0.float() @ self.A0.float())

    def as_plain_lora(self):
        """(A, B) of plain LoRA of rank 2r on the pretrained W0, with the same alpha / r."""
        A = torch.cat([self.lora_A.weight, self.A0])
        B = torch.cat([self.lora_B.weight, -self.B0], dim=1)
        return A, B


@torch.no_grad()
def what_lora_learned(model):
    """Per adapter (path, |dW| / |W0|, dW's nonzero singular values largest first, amplification):
    dW = (alpha / r) B A as saved (PiSSA's as plain LoRA), W0 the pretrained weight, Frobenius
    norms; the amplification |dW| / |U^T W0 V|, with U, V dW's singular vectors, is how much dW
    enlarges the directions it shares with W0 (Hu et al., 2021, section 7). dW is taken apart
    through the QR factors of B and A: an SVD of an r x r matrix, none of d x d."""
    layers = []
    for path, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        pissa = isinstance(module, PiSSALinear)
        A, B = module.as_plain_lora() if pissa else (module.lora_A.weight, module.lora_B.weight)
        W0 = module.base.weight.float()
        if pissa:  # its base holds W0 less the start: put it back
            W0 = W0 + module.scale * module.B0.float() @ module.A0.float()
        Qb, Rb = torch.linalg.qr(B.float())
        Qa, Ra = torch.linalg.qr(A.float().T)
        U, S, Vh = torch.linalg.svd(module.scale * Rb @ Ra.T)
        rank = int((S > 1e-5 * S.max()).sum())  # PiSSA's 2r may hold fewer directions than that
        U, S, V = Qb @ U[:, :rank], S[:rank], Qa @ Vh[:rank].T
        shared = (U.T @ W0 @ V).norm()
        layers.append((path, (S.norm() / W0.norm()).item(), S.tolist(),
                       (S.norm() / shared).item() if rank else 0.0))
    return layers


def count_per_rank(model, paths):
    """Trainable numbers per unit of rank on these Linear paths: the sum of d_in + d_out."""
    return sum(model.get_submodule(p).in_features + model.get_submodule(p).out_features
               for p in paths)


def largest_rank(per_rank, other_trainable, max_trainable):
    """The largest r with other_trainable + r * per_rank <= max_trainable (0: none fits)."""
    return max(0, (max_trainable - other_trainable) // per_rank)


def parameter_table(model, new=()):
    """Where the parameters are, each tensor counted once: frozen, LoRA, new for the task, other."""
    rows = {"frozen (pretrained)": 0, "LoRA (A and B)": 0, "new for the task (head)": 0,
            "other trained": 0}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            rows["LoRA (A and B)"] += p.numel()
        elif any(name.startswith(path + ".") for path in new):
            rows["new for the task (head)"] += p.numel()
        else:
            rows["other trained" if p.requires_grad else "frozen (pretrained)"] += p.numel()
    total = sum(rows.values())
    if not rows["other trained"]:
        del rows["other trained"]
    rows["trainable in total"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows["all parameters"] = total
    lines = [f"{'parameters':<25}{'count':>14}{'share':>9}"]
    lines += [f"{k:<25}{v:>14,}{v / total:>9.2%}" for k, v in rows.items()]
    return "\n".join(lines)
