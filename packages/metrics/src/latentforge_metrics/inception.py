"""The FID Inception network (TF "inception-2015-12-05", pytorch-fid's port) and its input protocols.

Every FID in the literature comes from this one set of weights, but the tools feed it differently:
pytorch-fid resizes with PyTorch's half-pixel bilinear and maps [0, 1] to [-1, 1]; the TF graph (the
ADM evaluator, TTUR) and torch-fidelity quantise to uint8, resize with TF1's bilinear (no half-pixel
offset) and map 0..255 with (x - 128) / 128; clean-fid resizes with PIL's antialiased bicubic on float
pixels. The features differ by 1-3 % between these paths, so the protocol is an explicit argument
here, never a hidden default of a helper.

The network differs from torchvision's InceptionV3 as the TF graph does: average pools in the
A/C/E blocks leave the padded zeros out, and the last block (Mixed_7c) pools with a max. Parameter
names follow torchvision, which is the layout of ``pt_inception-2015-12-05-6726825d.pth`` (566 keys)
and of torch-fidelity's converted file. torchvision itself is not imported: its compiled ops do not
load beside every torch build and nothing of it is needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentforge_core.checkpoint import load_into, load_state_file
from latentforge_core.errors import InputError, InputTypeError, MissingFileError, checking_values

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
INPUT_SIZE = 299
FEATURES = ("pool3", "logits", "spatial")  # 2048-d FID, 1008-way IS logits (no bias), 2023-d sFID


# ------------------------------------------------------------------------------------------------
# Input protocols
# ------------------------------------------------------------------------------------------------
@attrs.frozen
class InceptionProtocol:
    """How images reach the network: quantisation, resize to 299 and value mapping."""

    name: str
    quantize: str | None  # float images → uint8 first: "round" (saved samples), "floor" (torchmetrics)
    resize: str  # "tf1-bilinear" | "bilinear" | "bilinear-antialias" | "pil-bicubic"
    normalize: str  # "tf": (x - 128) / 128 on 0..255;  "2x-1": 2x - 1 on [0, 1]


PROTOCOLS: dict[str, InceptionProtocol] = {
    # TF graph semantics: the ADM evaluator (reference batches of RAE/LightningDiT), TTUR, torch-fidelity
    # (DiGIT), torchmetrics(antialias=False). Float images are rounded to uint8 as a saved sample is.
    "torch-fidelity": InceptionProtocol("torch-fidelity", "round", "tf1-bilinear", "tf"),
    # pytorch-fid's InceptionV3(resize_input=True, normalize_input=True) on ToTensor images.
    "pytorch-fid": InceptionProtocol("pytorch-fid", None, "bilinear", "2x-1"),
    # torchmetrics >= 1.8 FrechetInceptionDistance(normalize=True) defaults: truncation, antialias.
    "torchmetrics": InceptionProtocol("torchmetrics", "floor", "bilinear-antialias", "tf"),
    # clean-fid's default mode="clean": PIL bicubic of float pixels (antialiased), never quantised.
    "clean": InceptionProtocol("clean", None, "pil-bicubic", "tf"),
}
PROTOCOL_ALIASES = {
    "adm": "torch-fidelity",
    "tf": "torch-fidelity",
    "ttur": "torch-fidelity",
    "clean-fid": "clean",
}


def get_protocol(protocol: str | InceptionProtocol) -> InceptionProtocol:
    if isinstance(protocol, InceptionProtocol):
        return protocol
    name = PROTOCOL_ALIASES.get(protocol, protocol)
    if name not in PROTOCOLS:
        known = sorted(PROTOCOLS) + sorted(PROTOCOL_ALIASES)
        raise InputError(f"unknown Inception protocol {protocol!r}; expected one of {known}")
    return PROTOCOLS[name]


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Validate ``[B, 3, H, W]`` images: uint8 in 0..255 or float in [0, 1]; returns them unchanged."""
    if not isinstance(images, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        hint = (
            " (channels-last? permute to [B, 3, H, W])" if images.ndim == 4 and images.shape[-1] == 3 else ""
        )
        raise InputError(f"{what} must have shape [B, 3, H, W] (RGB), got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise InputError(f"{what} is an empty batch")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise InputTypeError(f"{what} must be uint8 (0..255) or float (0..1), got dtype {images.dtype}")
    if not checking_values():
        return images
    lo, hi = (v.item() for v in torch.aminmax(images))  # one pass; NaN and inf propagate into it
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{what} contain NaN or infinite values")
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " (images in [-1, 1]? use (x + 1) / 2)" if lo < 0 else " (images in 0..255? divide by 255)"
        raise InputError(f"float {what} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")
    return images


def to_uint8(images: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """Float [0, 1] → uint8: "round" is DiT's ``clamp(127.5x + 128)`` on [-1, 1]; "floor" truncates."""
    if images.dtype == torch.uint8:
        return images
    x = images.clamp(0, 1) * 255
    return torch.floor(x + 0.5 if mode == "round" else x).to(torch.uint8)


def _tf1_resize_matrix(size_in: int, size_out: int, device, dtype) -> torch.Tensor:
    """[out, in] bilinear weights with TF1 semantics: source coordinate = i * in / out, no half pixel."""
    src = torch.arange(size_out, device=device, dtype=torch.float32) * (size_in / size_out)
    lo = src.long()
    hi = (lo + 1).clamp_max(size_in - 1)
    frac = (src - lo.float()).to(dtype)
    weights = torch.zeros(size_out, size_in, device=device, dtype=dtype)
    rows = torch.arange(size_out, device=device)
    weights[rows, lo] += 1 - frac
    weights[rows, hi] += frac
    return weights


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``ResizeBilinear(align_corners=False)`` of float ``[B, C, H, W]`` to ``size`` x ``size``."""
    rows = _tf1_resize_matrix(x.shape[-2], size, x.device, x.dtype)
    cols = _tf1_resize_matrix(x.shape[-1], size, x.device, x.dtype)
    return rows @ x @ cols.T  # [B, C, size, size]


def resize_pil_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's ``resize(BICUBIC)`` of float ``[B, C, H, W]`` on 0..255, each channel an 'F'-mode image.

    PIL filters horizontally, then vertically, with a = -0.5 cubic weights widened by the downscale factor
    (antialias), sums in float64 and stores float32 after each pass; torch's antialiased bicubic has
    PIL's weights, so two float64 passes with float32 rounding between them give PIL's values (clean-fid
    ``make_resizer("PIL", False, "bicubic", ...)``, which then clips to 0..255).
    """
    x = x.double()
    if x.shape[-1] != size:  # PIL skips a pass whose size does not change
        x = F.interpolate(x, size=(x.shape[-2], size), mode="bicubic", antialias=True, align_corners=False)
        x = x.float().double()
    if x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.float().clamp_(0, 255)  # [B, C, size, size]


def _resize(x: torch.Tensor, mode: str) -> torch.Tensor:
    if x.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return x  # every resize of these protocols is the identity at 299
    with torch.autocast(x.device.type, enabled=False):  # fp32 inside a caller's autocast too
        if mode == "tf1-bilinear":
            return resize_tf1_bilinear(x, INPUT_SIZE)
        if mode == "pil-bicubic":
            return resize_pil_bicubic(x, INPUT_SIZE)
        size = (INPUT_SIZE, INPUT_SIZE)
        return F.interpolate(
            x, size=size, mode="bilinear", align_corners=False, antialias=mode == "bilinear-antialias"
        )


def preprocess(images: torch.Tensor, protocol: str | InceptionProtocol) -> torch.Tensor:
    """Images (uint8 0..255 or float [0, 1]) → the network input ``[B, 3, 299, 299]`` of ``protocol``."""
    protocol = get_protocol(protocol)
    images = check_images(images)
    if protocol.normalize == "2x-1":  # pytorch-fid: resize the [0, 1] image, then 2x - 1
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        x = _resize(x, protocol.resize)  # a fresh tensor (/255, clamp or resize): scaled in place
        return x.mul_(2).sub_(1)
    if protocol.quantize is not None:
        x = to_uint8(images, protocol.quantize).float()
    else:
        x = images.float() if images.dtype == torch.uint8 else images.float().clamp(0, 1) * 255
    return (_resize(x, protocol.resize) - 128) / 128


# ------------------------------------------------------------------------------------------------
# Blocks (torchvision names; TF pooling semantics)
# ------------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm(eps=1e-3) → ReLU.

    Without autograd the BatchNorm (always in eval mode here) is folded into the conv's weight and
    bias, and the ReLU runs in place: one conv instead of three passes over the activations. The
    folded pair is cached and rebuilt whenever a parameter or statistic is replaced, changed in place
    (``load_state_dict``) or moved. With autograd on, the layers run as stored, so gradients reach them.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)
        self._folded: tuple | None = None  # (source versions, weight, bias)

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv weight and bias with the BatchNorm's affine map and running statistics folded in."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # [out]
        weight = self.conv.weight * scale[:, None, None, None]  # [out, in, kh, kw]
        if weight.device.type == "cpu":  # oneDNN runs channels-last convs without reorders
            weight = weight.contiguous(memory_format=torch.channels_last)
        return weight, bn.bias - bn.running_mean * scale

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``fold()``, cached while the sources keep their storage and version counters."""
        bn = self.bn
        sources = (self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if any(t.is_inference() for t in sources):  # built under inference_mode: no version counter
            return self.fold()
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in sources)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, *self.fold())
        return self._folded[1], self._folded[2]

    def forward(self, x):
        if torch.is_grad_enabled():
            return F.relu(self.bn(self.conv(x)))
        weight, bias = self.folded()
        return F.relu_(F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding))


def _pool3x3(x: torch.Tensor, kind: str) -> torch.Tensor:
    """TF's 3x3 stride-1 'SAME' pool: averages leave the padding out; Mixed_7c uses a max."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool3x3(x, "avg"))
        return torch.cat([b1, b5, b3, bp], dim=1)  # [B, 224 + pool_features, H, W]


class InceptionB(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)  # [B, 480 + in_ch, H/2, W/2]


class InceptionC(nn.Module):
    def __init__(self, in_ch: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_pool3x3(x, "avg"))
        return torch.cat([b1, b7, bd, bp], dim=1)  # [B, 768, 17, 17]


class InceptionD(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)  # [B, 1280, 8, 8]


class InceptionE(nn.Module):
    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        bp = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([b1, b3, bd, bp], dim=1)  # [B, 2048, 8, 8]


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------
class FIDInceptionV3(nn.Module):
    """pool3 (2048), unbiased logits (1008) and sFID spatial features (2023) of the FID Inception.

    ``forward(images)`` takes uint8 or [0, 1] float ``[B, 3, H, W]`` and applies ``protocol``;
    ``forward_features(x)`` takes an already preprocessed ``[B, 3, 299, 299]`` batch. Inference runs in
    fp32 even inside a caller's autocast (bf16 would move FID): the reference numbers are all fp32. On
    CPU the activations are channels-last, which oneDNN's convs and the pools run fastest.
    """

    def __init__(self, protocol: str | InceptionProtocol = "torch-fidelity"):
        super().__init__()
        self.protocol = get_protocol(protocol)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.initialize_weights()
        self.eval()
        self.requires_grad_(False)

    def initialize_weights(self):
        """Random weights with signal (He-normal convs, identity BN): for tests and demos only."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True):
        """Always in eval mode: BatchNorm must use the TF running statistics."""
        return super().train(False)

    def forward_features(self, x: torch.Tensor, features=FEATURES) -> dict[str, torch.Tensor]:
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise InputError(f"unknown Inception feature(s) {sorted(unknown)}; expected some of {FEATURES}")
        with torch.autocast(x.device.type, enabled=False):
            return self._features(x, features)

    def _features(self, x: torch.Tensor, features) -> dict[str, torch.Tensor]:
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [B, 288, 35, 35]
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # [B, 768, 17, 17]
        out = {}
        if "spatial" in features:  # TF's mixed_6/conv: the 1x1 branch of Mixed_6d, 7 channels, NHWC order
            s = self.Mixed_6d.branch1x1(x)[:, :7]  # [B, 7, 17, 17]
            out["spatial"] = s.permute(0, 2, 3, 1).flatten(1)  # [B, 2023], (h w c) order
        if not {"pool3", "logits"} & set(features):
            return out
        x = self.Mixed_6e(self.Mixed_6d(x))  # [B, 768, 17, 17]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B, 2048, 8, 8]
        pool3 = x.mean(dim=(2, 3))  # [B, 2048]
        if "pool3" in features:
            out["pool3"] = pool3
        if "logits" in features:  # the TF softmax input: no bias (torch-fidelity's 'logits_unbiased')
            out["logits"] = pool3 @ self.fc.weight.T  # [B, 1008]
        return out

    @torch.no_grad()
    def forward(self, images: torch.Tensor, features=("pool3",)) -> dict[str, torch.Tensor]:
        device = self.fc.weight.device
        x = preprocess(images.to(device), self.protocol)
        return self.forward_features(x, features)

    def load_weights(self, path: str | os.PathLike) -> FIDInceptionV3:
        """Load pytorch-fid's or torch-fidelity's ``.pth`` (strict; ``weights_only=True``)."""
        state = load_state_file(path)
        for key, value in self.state_dict().items():  # torch-fidelity's file has no BN counters
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = value
        load_into(self, state)
        return self


def default_weights_path() -> Path:
    """Where pytorch-fid's download lands (torch hub cache), so one download serves both tools."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def fid_inception_v3(
    weights: str | os.PathLike | None = None,
    protocol: str | InceptionProtocol = "torch-fidelity",
    device=None,
) -> FIDInceptionV3:
    """The FID Inception with the 2015-12-05 weights from ``weights`` (default: the torch hub cache)."""
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise MissingFileError(
            f"FID Inception weights not found at {path}. Download {FID_WEIGHTS_URL} (or run pytorch-fid "
            "once, which caches it there) and pass weights=<path>; latentforge does not download them"
        )
    model = FIDInceptionV3(protocol).load_weights(path)
    return model.to(device) if device is not None else model
