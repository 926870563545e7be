"""The reference architectures, sized for 1x28x28 Fashion-MNIST images."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            # Projection shortcut (option B): a real 1x1 conv, so it is a quantizable layer too.
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 16/32/64 channels, 3 blocks per stage (`blocks_per_stage` n gives
    the depth 6n+2 ResNets: n=18 is ResNet-110)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2Small(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) shrunk for 28x28: inverted residuals with depthwise 3x3 convs."""

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1))  # (expand, c_out, repeats, stride)

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        blocks, c_in = [], 16
        for expand, c_out, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c_in, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6())
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, token_hidden)
        self.token_fc2 = nn.Linear(token_hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, channel_hidden)
        self.channel_fc2 = nn.Linear(channel_hidden, dim)

    def forward(self, x):  # x: [B, tokens, dim]
        y = self.norm1(x).transpose(1, 2)
        y = self.token_fc2(nn.functional.gelu(self.token_fc1(y))).transpose(1, 2)
        x = x + y
        y = self.channel_fc2(nn.functional.gelu(self.channel_fc1(self.norm2(x))))
        return x + y


class MLPMixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al. 2021): 4x4 patches, 49 tokens; nearly all weights are in linear layers."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        dim: int = 128,
        depth: int = 4,
        patch: int = 4,
        image: int = 28,
    ):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 64, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.fc(x.mean(1))


ARCHITECTURES = {
    "resnet20-fmnist": ResNet20,
    "mobilenetv2-fmnist": MobileNetV2Small,
    "mixer-fmnist": MLPMixer,
}
