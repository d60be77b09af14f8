"""Models for the converter tests and the benchmarks, written out here because torchvision is not
installable: ResNet-18/50-shaped networks (torchvision's BasicBlock / Bottleneck code, with its
inplace ReLUs, `out += identity` and the conv+BN downsample branch; `width` scales the channels)
and CNNs in the style of the PyTorch tutorials (functional F.relu calls, nn.Sequential stacks,
LeakyReLU/SiLU heads)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision.models.ResNet's structure; resnet(18) / resnet(50) below."""

    def __init__(self, block, layers, width=64, num_classes=10, zero_init_residual=False):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth, width=64, **kwargs):
    if depth == 18:
        return ResNet(BasicBlock, [2, 2, 2, 2], width, **kwargs)
    if depth == 50:
        return ResNet(Bottleneck, [3, 4, 6, 3], width, **kwargs)
    raise ValueError(depth)


class TutorialCNN(nn.Module):
    """The CIFAR-10 tutorial network with batch norm, functional calls: F.relu(bn(conv(x)))."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.bn3 = nn.BatchNorm1d(120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = self.bn3(self.fc1(x)).relu()
        return self.fc3(F.relu(self.fc2(x), inplace=True))


def sequential_cnn():
    """An nn.Sequential stack with inplace ReLU, LeakyReLU and SiLU after batch norms."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
        nn.GELU(approximate="tanh"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10))


class FunctionalActs(nn.Module):
    """F.leaky_relu / F.silu / F.gelu(tanh) / x.add(...) forms and a 1d/3d batch norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.bn3d = nn.BatchNorm3d(4)
        self.bn_a = nn.BatchNorm3d(4)
        self.lin = nn.Linear(4, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.bn_b = nn.BatchNorm1d(6)

    def forward(self, x):
        h = F.leaky_relu(self.bn3d(self.conv(x)), 0.1)
        h = F.silu(self.bn_a(h).add(x.mean(1, keepdim=True).expand_as(h)))
        v = F.gelu(self.bn1d(self.lin(h.mean((2, 3, 4)))), approximate="tanh")
        return torch.add(self.bn_b(v), v).relu_()


class LeakyBasicBlock(BasicBlock):
    """BasicBlock with LeakyReLU(0.01, inplace=True): the invertible activation that
    memory-saving mode can recover x_hat from (InPlace-ABN's choice)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = nn.LeakyReLU(0.01, inplace=True)


def saved_activation_bytes(fn, *inputs, exclude=()):
    """Bytes of the tensors autograd keeps for the backward of fn(*inputs), counted once per
    storage, without parameters and buffers (they exist anyway) and without the storages of
    `exclude` (e.g. a block's input, which its producer accounts for). Returns (bytes, output)."""
    owners = [fn] if isinstance(fn, nn.Module) else []
    skip = {t.untyped_storage().data_ptr() for m in owners
            for t in list(m.parameters()) + list(m.buffers())}
    skip |= {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return sum(seen.values()), out
