"""The reference networks, in torch (training only; the service runs their ONNX export)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


NODULE_WIDTHS = (16, 32, 64, 128)
"""Channels of the reference nodule network's four levels (lung-nodule-ct 1.1.0)."""


class NoduleUNet(nn.Module):
    """A small 2.5D U-Net: ``context`` neighbouring slices in, one logit map for the centre
    slice out. Four levels give a receptive field of about 70 pixels (70 mm at 1 mm
    spacing), enough to see a 30 mm nodule with its surroundings. With 16-128 channels it
    costs about 28 k multiply-adds per pixel, and a whole chest still runs in seconds on
    two CPU cores."""

    def __init__(self, context: int = 5, widths=NODULE_WIDTHS):
        super().__init__()
        self.enc = nn.ModuleList()
        cin = context
        for w in widths:
            self.enc.append(_block(cin, w))
            cin = w
        self.dec = nn.ModuleList()
        for w_skip, w_in in zip(reversed(widths[:-1]), reversed(widths[1:])):
            self.dec.append(_block(w_in + w_skip, w_skip))
        self.head = nn.Conv2d(widths[0], 1, 1)
        # start from "almost nothing is a nodule" (a prior of 2%, as RetinaNet does): with
        # a zero bias the first run learned to call a nodule wherever its last features
        # were all zero, which capped every score at sigmoid(bias) = 0.78 and called
        # featureless air a nodule
        nn.init.constant_(self.head.bias, -4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.enc):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.dec, reversed(skips[:-1])):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class TriageCNN(nn.Module):
    """The source documents' classifier: Conv 32 3x3 ReLU, max-pool, Conv 64 3x3 ReLU,
    max-pool, Dense 128 ReLU, Dense 1 sigmoid on a 256x256x1 slice.

    One change: global average pooling before the dense layers. Flattening the 62x62x64
    features would put 31.5 M weights in the first dense layer (a 134 MB file); pooling
    leaves 8 k there and keeps the model under 100 kB. The sigmoid stays outside the
    graph for training (BCE with logits) and is added for export."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(x)))


class WithSigmoid(nn.Module):
    """The exported graph: ``sigmoid(logit / temperature)``.

    A temperature above 1 leaves the 0.5 contour (a logit of 0), and so every segmented
    region and the order of all scores, as they are. It spreads the scores near 1: in
    float32 a plain sigmoid returns exactly 1.0 for every logit above about 17, and the
    nodule network's confident findings and its most confident false positives then tie
    at 1.0, with no threshold between them."""

    def __init__(self, net: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.net = net
        self.temperature = float(temperature)

    def forward(self, x):
        logits = self.net(x)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.sigmoid(logits)
