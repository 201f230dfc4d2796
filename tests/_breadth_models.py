"""Small models that reproduce the breadth failures of issue 11 (architectures qcompile did not write).

Each is a few layers of a public architecture's distinctive construct: ShuffleNetV2's channel shuffle,
in-place activations left in an eval graph, SqueezeNet's fire block, an Inception-style cat of several
branches, a GhostNet-style chunk, a tiny ViT and GPT-2's ``Conv1D`` (``addmm`` with a constant weight).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelShuffle(nn.Module):
    """ShuffleNetV2: ``view -> transpose -> contiguous -> view`` between two convs."""

    def __init__(self, c=16, groups=2):
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        b, c, h, w = x.shape
        x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.conv2(x)


class InplaceActs(nn.Module):
    """In-place activations and dropout in an eval graph (silu_, dropout_, leaky_relu_, sigmoid_, ...)."""

    def __init__(self, c=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.conv3 = nn.Conv2d(c, c, 1)
        self.drop = nn.Dropout(0.2, inplace=True)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.silu(self.conv1(x), inplace=True)
        x = F.leaky_relu(self.conv2(x), 0.1, inplace=True)
        x = self.drop(x)
        g = self.conv3(x)
        x = x * g.sigmoid_()
        x = F.hardswish(x, inplace=True)
        x = F.elu(x, inplace=True)
        return self.fc(x.mean((2, 3)))


class Fire(nn.Module):
    """SqueezeNet's fire block: squeeze 1x1 -> (expand 1x1, expand 3x3) -> cat."""

    def __init__(self, cin=16, squeeze=8, expand=16):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)


class SqueezeFire(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.fire = Fire(16, 8, 16)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = self.fire(F.relu(self.stem(x)))
        return self.head(x).mean((2, 3))


class MultiCat(nn.Module):
    """Inception-style: four branches (1x1, 3x3, 5x5, pool -> 1x1) joined by one cat."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Conv2d(16, c, 1)
        self.b3 = nn.Conv2d(16, c, 3, padding=1)
        self.b5 = nn.Conv2d(16, c, 5, padding=2)
        self.bp = nn.Conv2d(16, c, 1)
        self.head = nn.Conv2d(4 * c, 10, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b3(x)), F.relu(self.b5(x)),
                       F.relu(self.bp(F.max_pool2d(x, 3, 1, 1)))], 1)
        return self.head(y).mean((2, 3))


class ChunkCat(nn.Module):
    """``conv -> relu -> chunk(2) -> conv on one half, cat with the other`` (GhostNet / CSP style)."""

    def __init__(self, c=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c // 2, c // 2, 3, padding=1)
        self.head = nn.Conv2d(c, 10, 1)

    def forward(self, x):
        a, b = F.relu(self.conv1(x)).chunk(2, dim=1)
        return self.head(torch.cat([a, F.relu(self.conv2(b))], 1))


class TinyViT(nn.Module):
    """Patch embedding conv -> flatten / transpose -> one pre-norm encoder block -> mean -> head."""

    def __init__(self, dim=32, heads=2, patch=4, classes=10):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D``: ``addmm(bias, x.view(-1, nx), weight)``, weight [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx ** -0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class MatmulMLP(nn.Module):
    """Conv1D (addmm), a bias-free ``x @ W`` (matmul) and ``torch.mm`` with constant weights."""

    def __init__(self, d=32):
        super().__init__()
        self.c_fc = Conv1D(2 * d, d)
        self.w2 = nn.Parameter(torch.randn(2 * d, d) * (2 * d) ** -0.5)
        self.register_buffer("w3", torch.randn(d, d) * d ** -0.5)

    def forward(self, x):
        h = F.gelu(self.c_fc(x))
        h = h @ self.w2
        return torch.mm(h.reshape(-1, h.shape[-1]), self.w3).view(h.shape)


class FlattenHead(nn.Module):
    """conv -> relu -> ``x.view(x.size(0), -1)`` -> linear: the classifier flatten torch.export bakes the batch
    into when it traces a batch of 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


class PadPoolStem(nn.Module):
    """BiT's stem: conv -> explicit zero ``pad`` -> max-pool -> GroupNorm (float) -> conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.pad = nn.ConstantPad2d((1, 1, 1, 1), 0.0)
        self.pool = nn.MaxPool2d(3, 2)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.pool(self.pad(self.conv(x))))))


class MaxOverDims(nn.Module):
    """``max(dim)`` of 4-D maps without keepdim, over channels and over height (Hiera's mask-unit pooling)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16 + 16, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        over_c = y.max(dim=1).values                      # [B, H, W]
        over_h = y.max(dim=2).values                      # [B, C, W]
        return self.head(torch.cat([over_c.mean(1), over_h.mean(2)], 1))


class PackedBiasAttention(nn.Module):
    """``F.multi_head_attention_forward`` with separate projection weights and a packed bias
    ``cat((q.bias, k.bias, v.bias))``, as WavLM calls it: the bias reaches each projection through a chunk."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.d, self.heads = d, heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        t = x.transpose(0, 1)
        y, _ = F.multi_head_attention_forward(
            t, t, t, self.d, self.heads, torch.empty([0]), torch.cat((self.q.bias, self.k.bias, self.v.bias)),
            None, None, False, 0.0, self.out.weight, self.out.bias, False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=self.q.weight, k_proj_weight=self.k.weight,
            v_proj_weight=self.v.weight)
        return y.transpose(0, 1)


class AlibiScores(nn.Module):
    """BLOOM's attention scores: ``baddbmm(alibi, q, k^T, beta=1, alpha=1/sqrt(d))`` -> softmax -> bmm."""

    def __init__(self, d=32, heads=4, seq=8):
        super().__init__()
        self.d, self.heads = d, heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("alibi", torch.linspace(-1, 0, seq).repeat(heads, 1).unsqueeze(1))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * self.heads, s, -1)
        scores = torch.baddbmm(self.alibi.repeat(b, 1, 1), q, k.transpose(1, 2), beta=1.0,
                               alpha=(self.d // self.heads) ** -0.5)
        y = torch.bmm(scores.softmax(-1), v).view(b, self.heads, s, -1).transpose(1, 2).reshape(b, s, self.d)
        return self.out(y)


class Spectral(nn.Module):
    """FNet's token mixing, ``fftn(x, dim=(1, 2)).real``, then a linear: ExecuTorch has no kernel for its FFT."""

    def __init__(self, d=16):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(torch.fft.fftn(x, dim=(1, 2)).real)


class RuntimeBias(Spectral):
    """A linear whose bias depends on the input (``bias * x.mean()``): no int8 kernel packs it."""

    def forward(self, x):
        return F.linear(x, self.fc.weight, self.fc.bias * x.mean())


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same values with channels-last strides (what image pipelines produce)."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def hwc_permuted(x: torch.Tensor) -> torch.Tensor:
    """The same values as a permuted (non-contiguous) view, like ``torch.from_numpy(hwc).permute(2, 0, 1)``."""
    return torch.from_numpy(x.permute(0, 2, 3, 1).contiguous().numpy()).permute(0, 3, 1, 2)


def images(n=4, seed=0, res=16, batch=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, res, res, generator=g) for _ in range(n)]
