"""Label-free quality monitors for a pretrained encoder: k-NN and linear-probe accuracy on pooled stage features.

Both freeze the encoder and read ``mean over (h, w)`` of one stage's output (a ViT: of one block's patch tokens,
by default the SimMIM paper's 8th of 12), the quickest way to see whether pretraining is learning anything before a
full fine-tune.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from simmim.data.labeled import LabeledDataset, check_class_count, open_labeled
from simmim.data.transforms import eval_transform

log = logging.getLogger(__name__)


def pooled_features(encoder: nn.Module, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
    """(B, C, H, W) -> (B, C_stage): a Swin's ``stage`` output map averaged over (h, w) (-1 = the last, normed); a
    ViT's patch tokens after block ``stage`` (0-based, -1 = the last) averaged, without the final norm, as the SimMIM
    paper's ViT linear probe."""
    if encoder.geometry()["family"] == "vit":
        from simmim.models.vit import vit_linear_probe_features

        return vit_linear_probe_features(encoder, x, block=stage % len(encoder.blocks) + 1)
    maps = encoder.forward_intermediates(x, norm=True, intermediates_only=True)  # list of (B, C_i, h_i, w_i)
    return maps[stage].mean(dim=(2, 3))


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, stage: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pooled_features` of ``stage`` for every batch: (N, C_stage) float32 and labels (N,)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats, labels = [], []
    for batch in loader:
        feats.append(pooled_features(encoder, batch["image"].to(device), stage).float().cpu())
        labels.append(batch["label"].cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN on cosine similarity (votes ``exp(sim / T)``, as in DINO's evaluation). Top-1 in [0, 1]."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(test_x), 1024):  # chunks keep the similarity matrix small
        sim = test_x[start:start + 1024] @ train_x.T  # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + 1024]).sum().item()
    return correct / len(test_x)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor) -> float:
    """Multinomial logistic regression (scikit-learn, standardised features) trained on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_x.numpy(), train_y.numpy())
    return float(np.mean(clf.predict(test_x.numpy()) == test_y.numpy()))


class FeatureMonitor:
    """k-NN and linear-probe accuracy of an encoder on a labelled set's train/val splits, at ``img_size``."""

    def __init__(self, data: str, img_size: int, mean: Any, std: Any, stage: int = -1, k: int = 20,
                 batch_size: int = 128, num_workers: int = 0) -> None:
        channels = len(mean)  # one normalisation value per input channel
        train = open_labeled(data, "train", channels=channels)
        check_class_count(list(train.classes), f"the probe data {data}")  # one class: k-NN top-1 is 100%
        val = open_labeled(data, "val", classes=list(train.classes), channels=channels)
        tf = eval_transform(img_size, crop_pct=1.0, mean=mean, std=std, channels=channels)
        self.loaders = [DataLoader(LabeledDataset(src, tf), batch_size=batch_size, num_workers=num_workers)
                        for src in (train, val)]
        self.stage, self.k = stage, k

    def __call__(self, encoder: nn.Module, linear_probe: bool = True) -> dict[str, float]:
        (tx, ty), (vx, vy) = (extract_features(encoder, loader, self.stage) for loader in self.loaders)
        out = {"monitor/knn_top1": knn_accuracy(tx, ty, vx, vy, self.k)}
        if linear_probe:
            out["monitor/linear_probe_top1"] = linear_probe_accuracy(tx, ty, vx, vy)
        return out
