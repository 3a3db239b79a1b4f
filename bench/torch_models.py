"""PyTorch versions of the benchmarked architectures, for the PyTorch and ONNX Runtime peers.

torchvision has no ResNet-v2 or EfficientNet-Lite, so both are written here from the
same layer tables as the Flax models (`crackjax.backbones.resnet_v2` and
`crackjax.backbones.efficientnet_lite`). Weights are random: the benchmark compares
speed, and the crackjax exactness tests compare features against Keras and PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from crackjax.backbones.efficientnet_lite import HEAD_FEATURES, STEM_FEATURES, block_configs
from crackjax.backbones.resnet_v2 import STACK_STRIDES, STACK_UNITS, STACK_WIDTHS


class PreActBottleneck(nn.Module):
    """Keras ResNet-v2 unit: BN-ReLU, 1x1, BN-ReLU, 3x3 (carries the stride), BN-ReLU, 1x1, plus shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int, project: bool):
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm2d(in_channels, eps=1.001e-5), nn.ReLU())
        self.project = nn.Conv2d(in_channels, 4 * width, 1, stride=stride) if project else None
        self.stride = stride
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width, eps=1.001e-5),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width, eps=1.001e-5),
            nn.ReLU(),
            nn.Conv2d(width, 4 * width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.preact(x)
        shortcut = self.project(preact) if self.project is not None else x[:, :, :: self.stride, :: self.stride]
        return shortcut + self.body(preact)


class ResNetV2(nn.Module):
    """ResNet-v2 50/101 feature extractor, `(batch, 3, 224, 224)` to `(batch, 2048)`."""

    def __init__(self, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.ZeroPad2d(1), nn.MaxPool2d(3, stride=2)]
        channels = 64
        for units, width, stride in zip(STACK_UNITS[depth], STACK_WIDTHS, STACK_STRIDES):
            for unit in range(1, units + 1):
                layers.append(PreActBottleneck(channels, width, stride if unit == units else 1, project=unit == 1))
                channels = 4 * width
        layers += [nn.BatchNorm2d(channels, eps=1.001e-5), nn.ReLU()]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class MBConv(nn.Module):
    """EfficientNet-Lite inverted residual block without squeeze-excite."""

    def __init__(self, config):
        super().__init__()
        hidden = config.input_features * config.expand_ratio
        layers: list[nn.Module] = []
        if config.expand_ratio != 1:
            layers += [nn.Conv2d(config.input_features, hidden, 1, bias=False), nn.BatchNorm2d(hidden, eps=1e-3), nn.ReLU6()]
        # "SAME" padding: symmetric for stride 1; for stride 2 on even sizes TensorFlow pads one less before.
        k, s = config.kernel_size, config.stride
        pad = (k // 2 - 1, k // 2, k // 2 - 1, k // 2) if s == 2 else (k // 2,) * 4
        layers += [
            nn.ZeroPad2d(pad),
            nn.Conv2d(hidden, hidden, k, stride=s, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, eps=1e-3),
            nn.ReLU6(),
            nn.Conv2d(hidden, config.output_features, 1, bias=False),
            nn.BatchNorm2d(config.output_features, eps=1e-3),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = config.stride == 1 and config.input_features == config.output_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor, `(batch, 3, 224, 224)` to `(batch, 1280)`."""

    def __init__(self):
        super().__init__()
        configs = block_configs(1.0, 1.0)
        layers: list[nn.Module] = [
            nn.ZeroPad2d((0, 1, 0, 1)),
            nn.Conv2d(3, STEM_FEATURES, 3, stride=2, bias=False),
            nn.BatchNorm2d(STEM_FEATURES, eps=1e-3),
            nn.ReLU6(),
        ]
        layers += [MBConv(config) for config in configs]
        layers += [nn.Conv2d(configs[-1].output_features, HEAD_FEATURES, 1, bias=False), nn.BatchNorm2d(HEAD_FEATURES, eps=1e-3), nn.ReLU6()]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def build(backbone: str) -> nn.Module:
    """Return the PyTorch model for a crackjax backbone name, in eval mode."""
    if backbone.startswith("resnet_v2_"):
        model = ResNetV2(int(backbone.removeprefix("resnet_v2_")))
    elif backbone == "efficientnet_lite0":
        model = EfficientNetLite0()
    else:
        raise ValueError(f"no PyTorch peer for backbone {backbone!r}; expected resnet_v2_50, resnet_v2_101 or efficientnet_lite0")
    return model.eval()
