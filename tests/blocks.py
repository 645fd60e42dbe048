"""Real network blocks written in torch in their training form, for the exporter corpus.

Each builder returns ``(net, example)``; tests/corpus.py exports them with both torch
exporters and says how many BNs each must keep (``EXPECTED_LEFT_MAX`` in
tests/test_corpus.py, exact for these blocks). Some blocks take a ``tweak`` run after the
corpus has given every BN realistic statistics, to plant the condition a negative case
needs (a negative scale).

Routes (issue 22): the map of a BN travels across a pool, a resize, a sum or into several
readers before it folds.
"""

from __future__ import annotations


def _torch():
    import torch
    import torch.nn as nn

    return torch, nn


def vgg_pool_bn():
    """VGG-style stage with the BN after the pool: Conv -> MaxPool -> BN -> ReLU, twice,
    then an AvgPool -> BN -> Linear head."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.pool = nn.MaxPool2d(2)
            self.head_bn = nn.BatchNorm1d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.b1(self.pool(self.c1(x))))
            x = torch.relu(self.b2(self.pool(self.c2(x))))
            return self.fc(self.head_bn(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))

    return Net(), torch.randn(2, 3, 16, 16)


def negative_scale_after_pool(net) -> None:
    """One channel of the first BN scales by a negative number: the max would become a min."""
    import torch

    with torch.no_grad():
        net.b1.weight[3] = -net.b1.weight[3]


def preact_residual():
    """Two pre-activation residual blocks (ResNet v2): BN -> ReLU -> Conv, the sum read by
    the next block and its shortcut, a final BN -> ReLU -> pool -> Linear."""
    torch, nn = _torch()

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.proj = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

        def forward(self, x):
            pre = torch.relu(self.bn1(x))
            shortcut = self.proj(pre) if self.proj is not None else x
            return self.conv2(torch.relu(self.bn2(self.conv1(pre)))) + shortcut

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
            self.norm = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.norm(self.blocks(self.stem(x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return Net(), torch.randn(2, 3, 16, 16)


def inception_fork():
    """An inception block whose input BN feeds three 1x1 convs and a MaxPool -> 1x1 branch."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.b1 = nn.Conv2d(16, 8, 1)
            self.b2 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.b3 = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2))
            self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(16, 4, 1))

        def forward(self, x):
            x = self.bn(torch.relu(self.stem(x)))
            return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)

    return Net(), torch.randn(2, 3, 12, 12)


def classifier_head():
    """Features -> ReLU -> BN -> global average pool -> flatten -> Linear."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.bn(torch.relu(self.conv(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return Net(), torch.randn(2, 3, 12, 12)


def sum_then_bn():
    """Convs of two tensors summed (a two-input fusion), one BN on the sum; then a 3-branch
    sum with a pooled branch, each branch reading its own tensor."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
            self.bn1 = nn.BatchNorm2d(8)
            self.c, self.d = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 1, bias=False)
            self.e = nn.Conv2d(8, 8, 1)
            self.bn2 = nn.BatchNorm2d(8)

        def forward(self, x):
            y = torch.relu(self.bn1(self.a(x) + self.b(torch.sigmoid(x))))
            pooled = nn.functional.max_pool2d(self.e(torch.tanh(y)), 3, 1, 1)
            return torch.relu(self.bn2(self.c(y) - self.d(torch.sigmoid(y)) + pooled))

    return Net(), torch.randn(2, 3, 12, 12)


def upsampling_decoder():
    """An FPN / U-Net decoder: Conv -> Upsample(nearest) -> BN, and a lateral conv plus an
    upsampled top conv summed, then BN."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.top = nn.Conv2d(16, 8, 1)
            self.bn_up = nn.BatchNorm2d(8)
            self.lateral = nn.Conv2d(3, 8, 1)
            self.top2 = nn.Conv2d(16, 8, 3, padding=1)
            self.bn_sum = nn.BatchNorm2d(8)

        def forward(self, x):
            deep = torch.relu(self.down(x))
            up = torch.relu(self.bn_up(nn.functional.interpolate(self.top(deep), scale_factor=2, mode="nearest")))
            merged = self.lateral(x) + nn.functional.interpolate(self.top2(deep), scale_factor=2, mode="bilinear",
                                                                 align_corners=False)
            return up + torch.relu(self.bn_sum(merged))

    return Net(), torch.randn(2, 3, 16, 16)


def counted_padding_pool():
    """Conv -> AvgPool2d(3, 1, 1) (torch counts the zero padding by default) -> BN: the shift
    does not commute with an average that counts padding, so the BN stays."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pool = nn.AvgPool2d(3, 1, 1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.pool(self.conv(x))))

    return Net(), torch.randn(2, 3, 10, 10)


def fork_with_activation():
    """A BN read by a conv and, besides it, by a ReLU: the route forks into a non-linear
    reader, so the BN stays."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.bn(torch.relu(self.stem(x)))
            return self.conv(y) + torch.relu(y)

    return Net(), torch.randn(2, 3, 10, 10)


# --- reparameterisable branches (issue 23): parallel branches of one tensor, summed ------


def _conv_bn(nn, c_in, c_out, k, stride=1, padding=0, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(c_out))


def repvgg():
    """RepVGG blocks in training form: 3x3 conv-BN + 1x1 conv-BN (+ a BN-only identity
    where stride 1 and widths match), summed, ReLU; one stride-2 block, two stride-1."""
    torch, nn = _torch()

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.dense = _conv_bn(nn, c_in, c_out, 3, stride, 1)
            self.one = _conv_bn(nn, c_in, c_out, 1, stride, 0)
            self.identity = nn.BatchNorm2d(c_in) if stride == 1 and c_in == c_out else None

        def forward(self, x):
            y = self.dense(x) + self.one(x)
            return torch.relu(y + self.identity(x) if self.identity is not None else y)

    return nn.Sequential(Block(3, 8, 2), Block(8, 8, 1), Block(8, 8, 1)), torch.randn(2, 3, 16, 16)


def overparameterised():
    """MobileOne-style: k = 3 parallel 3x3 conv-BN branches, a 1x1 conv-BN scale branch and a
    BN identity, summed (depthwise, then pointwise)."""
    torch, nn = _torch()

    class Block(nn.Module):
        def __init__(self, c, k, groups, kernel):
            super().__init__()
            self.branches = nn.ModuleList(_conv_bn(nn, c, c, kernel, 1, kernel // 2, groups) for _ in range(k))
            self.scale = _conv_bn(nn, c, c, 1, 1, 0, groups) if kernel > 1 else None
            self.identity = nn.BatchNorm2d(c)

        def forward(self, x):
            y = self.identity(x) + sum(branch(x) for branch in self.branches)
            return torch.relu(y + self.scale(x) if self.scale is not None else y)

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8, 3, 8, 3), Block(8, 3, 1, 1)), \
        torch.randn(2, 3, 12, 12)


def repconv():
    """YOLO's RepConv (RepConvN): 3x3 conv-BN + 1x1 conv-BN, summed, SiLU; no identity."""
    torch, nn = _torch()

    class Block(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv1 = _conv_bn(nn, c_in, c_out, 3, 1, 1)
            self.conv2 = _conv_bn(nn, c_in, c_out, 1, 1, 0)

        def forward(self, x):
            return nn.functional.silu(self.conv1(x) + self.conv2(x))

    return nn.Sequential(Block(3, 8), Block(8, 16)), torch.randn(2, 3, 12, 12)


def acnet():
    """ACNet's asymmetric convolution block: 3x3 + 1x3 + 3x1 conv-BN branches, summed."""
    torch, nn = _torch()

    class Block(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.square = _conv_bn(nn, c_in, c_out, (3, 3), 1, (1, 1))
            self.hor = _conv_bn(nn, c_in, c_out, (1, 3), 1, (0, 1))
            self.ver = _conv_bn(nn, c_in, c_out, (3, 1), 1, (1, 0))

        def forward(self, x):
            return torch.relu(self.square(x) + self.hor(x) + self.ver(x))

    return nn.Sequential(Block(3, 8), Block(8, 8)), torch.randn(2, 3, 12, 12)


def grouped_identity():
    """A grouped 3x3 conv-BN (groups 4) with a 1x1 grouped conv-BN and a BN identity branch:
    the identity kernel of a grouped conv indexes ``o mod (C/g)``."""
    torch, nn = _torch()

    class Block(nn.Module):
        def __init__(self, c, groups):
            super().__init__()
            self.dense = _conv_bn(nn, c, c, 3, 1, 1, groups)
            self.one = _conv_bn(nn, c, c, 1, 1, 0, groups)
            self.identity = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.dense(x) + self.one(x) + self.identity(x))

    return nn.Sequential(nn.Conv2d(3, 16, 1), Block(16, 4), Block(16, 16)), torch.randn(2, 3, 10, 10)


def layer_scaled_mixer():
    """FastViT's RepMixer: ``x + ls * (mixer(x) - norm(x))`` with a depthwise 3x3 conv-BN and
    a BN identity as the mixer, a BN-only norm and a per-channel layer scale."""
    torch, nn = _torch()

    class Mixer(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.dw = _conv_bn(nn, c, c, 3, 1, 1, c)
            self.mixer_identity = nn.BatchNorm2d(c)
            self.norm = nn.BatchNorm2d(c)
            self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

        def forward(self, x):
            return x + self.layer_scale * (self.dw(x) + self.mixer_identity(x) - self.norm(x))

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Mixer(8), nn.ReLU(), Mixer(8)), torch.randn(2, 3, 10, 10)


def mismatched_branches():
    """Negative cases that stay exact: a stride-1 3x3 beside a dilated 3x3 (dilations
    differ), a depthwise 3x3 beside a dense 1x1 (groups differ), and a branch whose conv
    output is read elsewhere too."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _conv_bn(nn, 8, 8, 3, 1, 1), nn.Sequential(
                nn.Conv2d(8, 8, 3, 1, 2, dilation=2, bias=False), nn.BatchNorm2d(8))
            self.c, self.d = _conv_bn(nn, 8, 8, 3, 1, 1, 8), _conv_bn(nn, 8, 8, 1, 1, 0)
            self.e, self.f = _conv_bn(nn, 8, 8, 3, 1, 1), _conv_bn(nn, 8, 8, 1, 1, 0)
            self.stem = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            y = torch.relu(self.a(x) + self.b(x))
            y = torch.relu(self.c(y) + self.d(y))
            shared = self.e(y)
            return torch.relu(shared + self.f(y)) + torch.sigmoid(shared)

    return Net(), torch.randn(2, 3, 10, 10)
