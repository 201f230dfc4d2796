"""Model shapes for ``qcompile demo --model resnet18 | mobilenet_v2 | bert_encoder``: hand-written
ResNet-18, MobileNetV2 (with squeeze-excite) and a BERT-style encoder with seeded random weights, and
deterministic smooth-noise images. Offline (no torchvision, nothing downloaded) and free of training or
data sets: the test fixtures built on them (trained digits models, MiniLM, accuracy) live in tests/_zoo.py.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODEL_NAMES = ("resnet18", "mobilenet_v2", "bert_encoder")


def _init_cnn(model: nn.Module) -> nn.Module:
    """torchvision-style init: kaiming (fan_out) convs, unit BN, small-normal Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


# ----------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_shaped(num_classes: int = 1000) -> nn.Module:
    """Standard ResNet-18 topology, randomly initialised (BN stats untouched: see make_resnet18)."""
    return _init_cnn(ResNet18(num_classes))


# ----------------------------------------------------------------------------- MobileNetV2
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(cin, cout, k, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """avgpool -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid -> scale the input."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid(inplace=False)

    def forward(self, x):
        s = self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio, act, use_se):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, act=act))  # expand
        layers.append(_conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=act))  # depthwise
        if use_se:
            layers.append(SqueezeExcite(hidden, _make_divisible(hidden // 4)))
        layers.append(_conv_bn_act(hidden, cout, 1, act=None))  # linear projection
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expand t, channels c, repeats n, first stride s): the standard MobileNetV2 table.
MOBILENET_V2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2 with V3-style mixes: stages 0-2 use ReLU6, stages 3+ Hardswish;
    squeeze-excite (if ``se``) in stages 2+ (so both ReLU6+SE and Hardswish+SE blocks exist)."""

    def __init__(self, num_classes=1000, width_mult=1.0, se=True, dropout=0.2):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_act(3, cin, 3, 2, act=nn.ReLU6)]
        for stage, (t, c, n, s) in enumerate(MOBILENET_V2_SETTINGS):
            cout = _make_divisible(c * width_mult)
            act = nn.Hardswish if stage >= 3 else nn.ReLU6
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, act, se and stage >= 2))
                cin = cout
        features.append(_conv_bn_act(cin, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2_shaped(num_classes: int = 1000, width_mult: float = 1.0, se: bool = True) -> nn.Module:
    return _init_cnn(MobileNetV2(num_classes, width_mult, se))


# ----------------------------------------------------------------------------- BERT-shaped encoder
MASK_VALUE = -10000.0  # additive attention-mask value for padded keys (classic BERT)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        assert hidden % heads == 0, "hidden must be divisible by heads"
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def _split(self, x):  # [B,T,H] -> [B,heads,T,d]
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, additive_mask):
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + additive_mask, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate, eps=1e-12):
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, additive_mask):
        x = self.attn_norm(x + self.attention(x, additive_mask))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertEncoder(nn.Module):
    def __init__(self, vocab=1000, hidden=256, layers=4, heads=4, intermediate=1024, max_len=128):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, intermediate) for _ in range(layers))
        for m in self.modules():  # BERT init: N(0, 0.02)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:  # a None check, not data-dependent: fine for torch.export
            attention_mask = torch.ones_like(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.emb_norm(self.tok_emb(input_ids) + self.pos_emb(pos)[None])
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * MASK_VALUE  # [B,1,1,T]
        for layer in self.layers:
            x = layer(x, additive)
        return x


def bert_encoder_shaped(vocab=1000, hidden=256, layers=4, heads=4, intermediate=1024, max_len=128) -> nn.Module:
    return BertEncoder(vocab, hidden, layers, heads, intermediate, max_len)


# ----------------------------------------------------------------------------- images + BN calibration
def image_batches(n: int, batch: int = 4, res: int = 224, seed: int = 0) -> list[torch.Tensor]:
    """``n`` deterministic "natural-ish" image batches [batch,3,res,res]: multi-scale smoothed
    noise (neighbouring pixels correlate, channels correlate), standardised per image like
    ImageNet-normalised inputs (mean ~0, std ~1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.zeros(batch, 3, res, res)
        for scale, weight in ((16, 1.0), (4, 0.5), (1, 0.15)):
            size = max(1, res // scale)
            noise = torch.randn(batch, 3, size, size, generator=g)
            noise = noise + torch.randn(batch, 1, size, size, generator=g)  # shared "luminance"
            img += weight * F.interpolate(noise, size=(res, res), mode="bilinear", align_corners=False)
        img = (img - img.mean(dim=(1, 2, 3), keepdim=True)) / img.std(dim=(1, 2, 3), keepdim=True)
        out.append(img)
    return out


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """Set BN running stats to the cumulative average over ``batches`` (train mode, momentum=None);
    returns ``model.eval()``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for b in batches:
        model(b)
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
    return model.eval()


def make_resnet18(seed: int = 0, res: int = 224, num_classes: int = 1000) -> nn.Module:
    """Seeded ResNet-18 with BN calibrated on 4 image_batches(batch=4, res); eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet18_shaped(num_classes)
    return calibrate_bn(model, image_batches(4, batch=4, res=res, seed=seed))


def make_mobilenet_v2(seed: int = 0, width_mult: float = 1.0, res: int = 224, se: bool = True,
                      num_classes: int = 1000, bn_gain: float = 0.5) -> nn.Module:
    """Seeded MobileNetV2 with BN calibrated on 4 image_batches(batch=4, res); eval mode.

    A random network whose BN layers normalise every channel to unit variance is chaotic: any
    perturbation (float rounding included) grows block by block, and torch.ao reaches ~4 dB SQNR on
    it. Trained networks are stable; ``bn_gain`` (BN weight x 0.5) puts this one in that regime."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mobilenet_v2_shaped(num_classes, width_mult, se)
    model = calibrate_bn(model, image_batches(4, batch=4, res=res, seed=seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(bn_gain)
    return model


def make_bert_encoder(seed: int = 0, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return bert_encoder_shaped(**kwargs).eval()


def _bert_inputs(vocab=1000, batch=2, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1:, seq * 3 // 4:] = 0  # second row padded
    return ids, mask


def get_model(name: str):
    """name (one of MODEL_NAMES) -> (eval model, example_inputs tuple)."""
    if name == "resnet18":
        return make_resnet18(), (image_batches(1, batch=1, seed=123)[0],)
    if name == "mobilenet_v2":
        return make_mobilenet_v2(), (image_batches(1, batch=1, seed=123)[0],)
    if name == "bert_encoder":
        return make_bert_encoder(), _bert_inputs()
    raise KeyError(f"unknown model {name!r}; choose from {MODEL_NAMES}")


def calibration_samples(name: str) -> list:
    """Calibration samples for a model of MODEL_NAMES: 8 BERT batches, or 16 single images at 224 px."""
    if name == "bert_encoder":
        return [_bert_inputs(seed=s) for s in range(1, 9)]
    return image_batches(16, batch=1, res=224, seed=1)
