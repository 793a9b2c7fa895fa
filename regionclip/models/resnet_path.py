"""The CLIP ResNet region path, computed fast: stem → layer1..4 with frozen BatchNorm folded into
the convolutions, and the attention pool that computes only the pooled query.

open_clip's ``ModifiedResNet`` runs every BatchNorm as its own pass over the activations (twice,
with backward) and its ``AttentionPool2d`` projects all ``h·w + 1`` tokens as queries to keep only
the first. Here, a BatchNorm in eval mode (a frozen one, or any one of a model in eval mode) is an
affine map ``y = x·s + t`` folded into its convolution: ``conv(x, w·s) + t``, computed from the
module's own weights at every call, so gradients still reach ``w`` (the same maths; the fp32
result differs from the unfolded one by rounding, ~1e-6 relative) and the module tree, state dict
and checkpoints are unchanged. A BatchNorm in training mode (a tower trained from scratch) runs as
a module. The attention pool uses only the mean token as query, as CLIP's original pool does.

Every function takes the open_clip modules it runs and works with any input size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from torch import nn

from regionclip.models.pos_embed import interpolate_pos_embed


def _affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` of a BatchNorm that does not update its statistics, else None."""
    if isinstance(bn, nn.BatchNorm2d) and (bn.training or bn.running_var is None):
        return None
    if not all(hasattr(bn, k) for k in ("weight", "bias", "running_mean", "running_var")):
        return None
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


def conv_bn(conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` with the BatchNorm folded into the convolution when it is an affine map."""
    affine = _affine(bn)
    if affine is None:
        return bn(conv(x))
    scale, shift = affine
    weight = conv.weight * scale.to(conv.weight.dtype).reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return F.conv2d(x, weight, bias.to(weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)


def bottleneck(block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``Bottleneck.forward`` with :func:`conv_bn`."""
    out = block.act1(conv_bn(block.conv1, block.bn1, x))
    out = block.act2(conv_bn(block.conv2, block.bn2, out))
    out = conv_bn(block.conv3, block.bn3, block.avgpool(out))
    identity = x
    if block.downsample is not None:  # avgpool, 1x1 conv, BatchNorm
        pool, conv, bn = block.downsample[0], block.downsample[1], block.downsample[2]
        identity = conv_bn(conv, bn, pool(x))
    return block.act3(out + identity)


def stage(layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for block in layer:
        x = bottleneck(block, x)
    return x


def stem(visual: ModifiedResNet, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``ModifiedResNet.stem`` (3 convs + avgpool, stride 4) with :func:`conv_bn`."""
    x = visual.act1(conv_bn(visual.conv1, visual.bn1, x))
    x = visual.act2(conv_bn(visual.conv2, visual.bn2, x))
    x = visual.act3(conv_bn(visual.conv3, visual.bn3, x))
    return visual.avgpool(x)


def c4_features(visual: ModifiedResNet, images: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, H, W] → layer3 features [B, C4, h, w] (stride 16)."""
    x = stem(visual, images.contiguous(memory_format=torch.channels_last))
    for layer in (visual.layer1, visual.layer2, visual.layer3):
        x = stage(layer, x)
    return x


def attention_pool(attnpool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """CLIP ResNet attention pool for any spatial size: [R, C, h, w] -> [R, D].

    The query is the mean token alone (the pooled output is its attention); other sizes than the
    training grid use a bicubically resized positional embedding.
    """
    grid = math.isqrt(attnpool.positional_embedding.shape[0] - 1)
    h, w = x.shape[-2:]
    pos = interpolate_pos_embed(attnpool.positional_embedding, (grid, grid), (h, w))
    tokens = x.flatten(2).permute(2, 0, 1)  # (hw)RC
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
    tokens = tokens + pos[:, None, :].to(tokens.dtype)
    out, _ = F.multi_head_attention_forward(
        query=tokens[:1],
        key=tokens,
        value=tokens,
        embed_dim_to_check=tokens.shape[-1],
        num_heads=attnpool.num_heads,
        q_proj_weight=attnpool.q_proj.weight,
        k_proj_weight=attnpool.k_proj.weight,
        v_proj_weight=attnpool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([attnpool.q_proj.bias, attnpool.k_proj.bias, attnpool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=attnpool.c_proj.weight,
        out_proj_bias=attnpool.c_proj.bias,
        use_separate_proj_weight=True,
        training=attnpool.training,
        need_weights=False,
    )
    return out[0]


def region_head(visual: ModifiedResNet, pooled: torch.Tensor) -> torch.Tensor:
    """RoI features [R, C4, s, s] → region embeddings [R, D] (layer4 → attention pool)."""
    return attention_pool(
        visual.attnpool, stage(visual.layer4, pooled.contiguous(memory_format=torch.channels_last))
    )
