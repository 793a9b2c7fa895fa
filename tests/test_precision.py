"""The compute-precision setting and what bf16 does to the numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regionclip.errors import ConfigError
from regionclip.models.region import RegionEncoder
from regionclip.precision import autocast, cpu_has_bf16, resolve_precision

CPU = torch.device("cpu")


def test_resolve_names_the_key_and_auto_follows_the_hardware():
    assert resolve_precision("fp32", CPU, "eval.precision") == "fp32"
    assert resolve_precision("bf16", CPU, "eval.precision") == "bf16"
    assert resolve_precision("auto", CPU, "eval.precision") == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(ConfigError, match="rpn.precision=fp16 needs a GPU"):
        resolve_precision("fp16", CPU, "rpn.precision")
    with pytest.raises(ConfigError, match="pretrain.precision='half'"):
        resolve_precision("half", CPU, "pretrain.precision")
    with autocast("fp32", CPU):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", CPU):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


@pytest.mark.slow
def test_rn50_region_embeddings_in_bf16_stay_within_cosine_099_of_fp32():
    """A random RN50 at RegionCLIP's input size (800 x 1066), 64 regions of 32-400 px."""
    import open_clip

    torch.manual_seed(0)
    encoder = RegionEncoder(open_clip.create_model("RN50").visual.eval())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 800, 1066, generator=g)
    xy = torch.rand(64, 2, generator=g) * torch.tensor([650.0, 400.0])
    boxes = [torch.cat([xy, xy + 32 + torch.rand(64, 2, generator=g) * 368], 1)]
    with torch.no_grad():
        fp32 = encoder(images, boxes)
        with autocast("bf16", CPU):
            bf16 = encoder(images, boxes).float()
    cos = F.cosine_similarity(fp32, bf16)
    assert cos.shape == (64,) and cos.min() >= 0.99, cos.min()
