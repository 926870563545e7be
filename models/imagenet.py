"""ImageNet-size reference architectures (3x224x224): ResNet-18 and MobileNetV2 (width 1.0).

torchvision 0.28 (the release paired with torch 2.13) cannot be used here: its wheel is built against
a CUDA torch and fails to load next to our CPU torch. These are written out with torchvision's module
names, shapes, defaults and initialisation, so a torchvision state dict loads into them key for key
and the parameter counts match (11,689,512 and 3,504,872 at 1000 classes; tests/test_imagenet_models.py).
ReLUs are not in-place: export functionalises them anyway and the module tree is the same.

models/build_imagenet.py gives them weights and exports them (`make imagenet-models`).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 224
NUM_CLASSES = 10  # the weights are fitted on Fashion-MNIST's ten classes (models/build_imagenet.py)


def _init(model: nn.Module) -> None:
    # torchvision's initialisation for both networks (ResNet's fc keeps PyTorch's default in torchvision;
    # it is refitted on data by the builder anyway).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision.models.resnet18: 7x7/2 stem, 3x3/2 max pool, four stages of two basic blocks."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (c_out, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            downsample = None
            if stride != 1 or c_in != c_out:
                downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            blocks = [BasicBlock(c_in, c_out, stride, downsample), BasicBlock(c_out, c_out)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        _init(self)

    def pooled(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.pooled(x))


class ConvBNActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation as MobileNetV2 uses it: indices 0 conv, 1 BN, 2 ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(c_in * expand_ratio))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(c_in, hidden, kernel=1))
        layers += [
            ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = c_out

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0): features.0..18, classifier = (Dropout 0.2, Linear)."""

    # (expand ratio t, channels c, repeats n, first stride s), as in the paper's Table 2.
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = NUM_CLASSES, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        c_in = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNActivation(3, c_in, stride=2)]
        for t, c, n, s in self.SETTINGS:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        features.append(ConvBNActivation(c_in, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        _init(self)
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)

    def pooled(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return torch.flatten(x, 1)

    def forward(self, x):
        return self.classifier(self.pooled(x))


ARCHITECTURES = {
    "resnet18-224": ResNet18,
    "mobilenetv2-224": MobileNetV2,
}


def head(model: nn.Module) -> nn.Linear:
    """The final classifier, the only layer the builder fits."""
    return model.fc if isinstance(model, ResNet18) else model.classifier[1]


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's input: global-average-pooled features."""
    return model.pooled(x)
