"""Empirical privacy audit: the loss-threshold membership-inference attack (Yeom et al. 2018,
"Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting", Sec. 3.2).

The attacker guesses "member" when an example's loss under the trained model is low. Sweeping the
threshold gives a ROC curve over members (training examples) and non-members (held out, same
distribution); we report its AUC (0.5 = the attack learns nothing) and the true-positive rate at a
1% false-positive rate, the low-FPR regime Carlini et al. 2022 ("Membership Inference Attacks From
First Principles") argue is the one that matters. DP-SGD bounds what any attack can reach: at
(epsilon, delta), TPR <= e^epsilon * FPR + delta.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from arbooth.errors import ConfigError


def roc_auc(member_scores: torch.Tensor, nonmember_scores: torch.Tensor) -> float:
    """P(score of a random member > score of a random non-member), ties counted half (Mann-Whitney U)."""
    m, n = member_scores.double().flatten(), nonmember_scores.double().flatten()
    if m.numel() == 0 or n.numel() == 0:
        raise ConfigError("the audit needs at least one member and one non-member")
    greater = (m[:, None] > n[None, :]).double().sum()
    ties = (m[:, None] == n[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (m.numel() * n.numel()))


def tpr_at_fpr(member_scores: torch.Tensor, nonmember_scores: torch.Tensor, fpr: float = 0.01) -> float:
    """Largest TPR over thresholds t ("member" iff score > t) whose FPR is at most `fpr`."""
    m, n = member_scores.double().flatten(), nonmember_scores.double().flatten()
    best = 0.0
    for t in torch.cat([n, m, torch.tensor([float("inf")], dtype=torch.double)]).unique():
        if (n > t).double().mean().item() <= fpr:
            best = max(best, (m > t).double().mean().item())
    return best


@dataclass(frozen=True)
class AuditResult:
    auc: float
    tpr_at_1pct_fpr: float
    members: int
    nonmembers: int
    member_loss: float          # mean loss, for context
    nonmember_loss: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"loss-threshold MIA: ROC AUC {self.auc:.4f}, TPR at 1% FPR {self.tpr_at_1pct_fpr:.4f} "
                f"({self.members} members, mean loss {self.member_loss:.4f}; {self.nonmembers} non-members, "
                f"mean loss {self.nonmember_loss:.4f})")


def loss_threshold_attack(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> AuditResult:
    """Score = -loss: lower loss, more likely a member."""
    return AuditResult(auc=roc_auc(-member_losses, -nonmember_losses),
                       tpr_at_1pct_fpr=tpr_at_fpr(-member_losses, -nonmember_losses, 0.01),
                       members=member_losses.numel(), nonmembers=nonmember_losses.numel(),
                       member_loss=member_losses.double().mean().item(),
                       nonmember_loss=nonmember_losses.double().mean().item())


@torch.no_grad()
def var_example_losses(vae: nn.Module, var: nn.Module, folder: str | Path, classes: list[str], *,
                       size: int, mid_size: int, batch_size: int = 16,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """Per-image VAR loss (mean token cross-entropy, no augmentation, no class dropout) of the images
    under folder/<class>/ (read as training reads class folders; unreadable files left out, never
    substituted), labelled by class NAME with the training run's class list."""
    from arbooth.data.class_dataset import ClassImageDataset, Sample, drop_unreadable, scan_image_folder
    from arbooth.models.var_training import encode_batch, var_loss

    samples, found = scan_image_folder(folder, split=None)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(f"{folder} has classes the model was not trained on: {unknown[:5]}")
    samples, unreadable = drop_unreadable([Sample(s.path, classes.index(found[s.label])) for s in samples])
    ds = ClassImageDataset(samples, classes, size=size, mid_size=mid_size, random_crop=False, hflip=False,
                           unreadable=unreadable)
    was_training = var.training
    var.eval()
    out = []
    for lo in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(lo, min(lo + batch_size, len(ds)))]
        img = torch.stack([it[0] for it in items]).to(device)
        label = torch.tensor([it[1] for it in items], device=device)
        idx_BL, x_BLCv = encode_batch(vae, img)
        out.append(var_loss(var(label, x_BLCv), idx_BL, reduction="none").cpu())
    var.train(was_training)
    return torch.cat(out)
