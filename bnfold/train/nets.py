"""The zoo's architectures: small, CPU-trainable in seconds, BN in every place users put it.

Each network exists to put BatchNormalization in a particular position the folder
has to handle (or refuse with a reason): after Gemm, after ReLU, on the graph
input, after strided / depthwise / bias-free convolutions, on both branches of a
residual add, after grouped and ungrouped ConvTranspose, in 1-D and 3-D. Channel
counts are kept tiny so the committed ``models/`` folder stays well under 5 MB.

Every class has an ``INPUT_LAYOUT`` (see :mod:`bnfold.train.data`) and a ``TASK``
("classification" -> logits, "reconstruction" -> an image).
"""

from __future__ import annotations

from torch import nn

N_CLASSES = 10


def _conv_bn_relu(cin, cout, k=3, stride=1, padding=1, groups=1, bias=True, momentum=0.1):
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias),
        nn.BatchNorm2d(cout, momentum=momentum),
        nn.ReLU(),
    ]


class DenseBN(nn.Module):
    """The textbook Dense+BN net: ``Linear -> BN1d -> ReLU`` x2 -> ``Linear`` (Gemm -> BN)."""

    INPUT_LAYOUT = "flat"
    TASK = "classification"

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, N_CLASSES),
        )

    def forward(self, x):
        return self.body(x)


class DenseInputNormBN(nn.Module):
    """BN on the raw input (input normalisation) and BN *after* each ReLU.

    None of these BNs has a linear producer: the first reads the graph input, the
    others read a ReLU. They are what a folder must keep (or fold forward into the
    next Gemm) and explain. Takes raw grey levels 0..16.
    """

    INPUT_LAYOUT = "flat_raw"
    TASK = "classification"

    def __init__(self, hidden: int = 32, momentum: float | None = 0.1):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm1d(64, momentum=momentum),
            nn.Linear(64, hidden), nn.ReLU(), nn.BatchNorm1d(hidden, momentum=momentum),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.BatchNorm1d(hidden, momentum=momentum),
            nn.Linear(hidden, N_CLASSES),
        )

    def forward(self, x):
        return self.body(x)


class ConvBN(nn.Module):
    """``Conv2d -> BN2d -> ReLU``, a strided conv, a depthwise conv + BN, a bias-free
    1x1 conv + BN, then ``Linear -> BN1d``: the common conv cases in one net."""

    INPUT_LAYOUT = "image"
    TASK = "classification"

    def __init__(self, momentum: float | None = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 8, momentum=momentum),                     # 8x8
            *_conv_bn_relu(8, 16, stride=2, momentum=momentum),          # 4x4, strided
            *_conv_bn_relu(16, 16, groups=16, momentum=momentum),        # depthwise
            *_conv_bn_relu(16, 16, k=1, padding=0, bias=False, momentum=momentum),  # bias-free
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32, momentum=momentum), nn.ReLU(),
            nn.Linear(32, N_CLASSES),
        )

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """A ResNet basic block; a strided block gets a 1x1 conv + BN shortcut, so BN sits
    on both branches of the residual Add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem + an identity block + a strided block with projection shortcut, global pool."""

    INPUT_LAYOUT = "image"
    TASK = "classification"

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, N_CLASSES)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class ConvAutoencoder(nn.Module):
    """Conv encoder, decoder of ``ConvTranspose2d -> BN2d`` with groups=1 and groups=4.

    Grouped ConvTranspose weights are laid out (C_in, C_out/groups, kH, kW), so
    folding BN's per-output-channel scale into them is the easy thing to get wrong.
    Output is the reconstructed image in [0, 1].
    """

    INPUT_LAYOUT = "image"
    TASK = "reconstruction"

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            *_conv_bn_relu(1, 8, stride=2),     # 4x4
            *_conv_bn_relu(8, 16, stride=2),    # 2x2
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),             # 4x4
            nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU(),  # 8x8
            nn.Conv2d(8, 1, 1), nn.Sigmoid(),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


class RowSequenceConv1d(nn.Module):
    """``Conv1d -> BN1d`` over the image rows taken as a sequence (BN on a 3-D tensor)."""

    INPUT_LAYOUT = "sequence"
    TASK = "classification"

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 16, 3, padding=2, dilation=2), nn.BatchNorm1d(16), nn.ReLU(),
        )
        self.fc = nn.Linear(16, N_CLASSES)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=2))


class ClipConv3d(nn.Module):
    """``Conv3d -> BN3d`` on a short clip of stacked frames (BN on a 5-D tensor)."""

    INPUT_LAYOUT = "clip"
    TASK = "classification"

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
            nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        )
        self.fc = nn.Linear(16, N_CLASSES)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3, 4)))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mlp": DenseBN,
    "mlp-inputnorm": DenseInputNormBN,
    "cnn": ConvBN,
    "resnet": TinyResNet,
    "autoencoder": ConvAutoencoder,
    "seq1d": RowSequenceConv1d,
    "clip3d": ClipConv3d,
}


def count_bn(net: nn.Module) -> int:
    """Number of BatchNorm modules in a network."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


__all__ = [
    "ARCHITECTURES", "BasicBlock", "ClipConv3d", "ConvAutoencoder", "ConvBN", "DenseBN",
    "DenseInputNormBN", "RowSequenceConv1d", "TinyResNet", "count_bn", "num_params",
]
