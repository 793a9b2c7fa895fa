"""The only place that tells CLIP image-tower types apart (open_clip ``ModifiedResNet`` or
``VisionTransformer``): what kind a tower is, its freezable stages, and the ResNet requirement of
the C4 detectors. Every other module asks here instead of testing classes itself."""

from __future__ import annotations

from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

KINDS = ("resnet", "vit")


def tower_kind(visual: nn.Module) -> str:
    """``"resnet"`` or ``"vit"``.

    Raises:
        TypeError: any other image tower (named).
    """
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, VisionTransformer):
        return "vit"
    raise TypeError(
        f"expected an open_clip ModifiedResNet or VisionTransformer image tower, got {type(visual).__name__}"
    )


def require_resnet(visual: nn.Module, what: str) -> ModifiedResNet:
    """``visual`` itself when it is a CLIP ResNet; ``what`` (e.g. "the C4 detector") names the user.

    Raises:
        TypeError: naming ``what`` and the tower type.
    """
    if not isinstance(visual, ModifiedResNet):
        raise TypeError(
            f"{what} needs a CLIP ResNet image tower (ModifiedResNet, e.g. RN50), got {type(visual).__name__}"
        )
    return visual


def visual_stages(visual: nn.Module) -> list[list[str]]:
    """Names (relative to ``visual``) of the modules/parameters of each freezable stage, in order.

    ResNet (Detectron2's ``FREEZE_AT``): stage 1 = stem (conv1-3, bn1-3, avgpool), stages 2-5 =
    layer1-layer4; the attention pool always trains (freeze_at <= 5).
    ViT: stage 1 = patch embedding (conv1, class token, positional embedding, ln_pre), stage
    1 + i = transformer block i; ``ln_post`` / ``proj`` always train (freeze_at <= 1 + blocks).
    """
    if tower_kind(visual) == "resnet":
        stem = [n for n, _ in visual.named_children() if not n.startswith(("layer", "attnpool"))]
        return [stem, ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    embed = ["conv1", "class_embedding", "positional_embedding", "ln_pre"]
    return [embed] + [[f"transformer.resblocks.{i}"] for i in range(len(visual.transformer.resblocks))]


def _is_module(parent: nn.Module, name: str) -> bool:
    try:
        parent.get_submodule(name)
    except AttributeError:
        return False
    return True


def freeze_stages(visual: nn.Module, freeze_at: int) -> list[nn.Module]:
    """Stop gradients of the first ``freeze_at`` stages of :func:`visual_stages` (in place).

    Returns the frozen modules (their owner keeps them in eval mode).

    Raises:
        ValueError: ``freeze_at`` outside 0 .. number of stages.
    """
    stages = visual_stages(visual)
    if not 0 <= freeze_at <= len(stages):
        raise ValueError(
            f"freeze_at={freeze_at} out of range for a {type(visual).__name__} image tower "
            f"(0 = only BatchNorm frozen ... {len(stages)} = all {len(stages)} stages frozen)"
        )
    frozen = []
    for name in (n for stage in stages[:freeze_at] for n in stage):
        if _is_module(visual, name):
            target = visual.get_submodule(name)
            target.requires_grad_(False)
            frozen.append(target)
        else:  # a bare parameter (ViT class token, positional embedding)
            getattr(visual, name).requires_grad_(False)
    return frozen
