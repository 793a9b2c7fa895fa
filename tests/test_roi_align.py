"""RoIAlign's sparse CPU backward against torchvision's own, on boxes inside, across and outside
the feature map, with adaptive and fixed sampling grids, aligned or not."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from regionclip.models.roi_align import roi_align


@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(0, True), (2, True), (0, False)])
def test_gradient_equals_torchvision(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 13, 17, generator=g)
    xy = torch.rand(30, 2, generator=g) * torch.tensor([250.0, 200.0]) - 20
    wh = 2 + torch.rand(30, 2, generator=g) * 150
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([0.0, 0.0, 272.0, 208.0])  # the whole map (stride 16)
    boxes[1] = torch.tensor([-40.0, -40.0, -20.0, -10.0])  # wholly outside: no gradient
    boxes[2] = torch.tensor([100.0, 100.0, 100.0, 100.0])  # empty
    per_image = [boxes[:18], boxes[18:]]
    grad_out = torch.randn(30, 8, 5, 5, generator=g)

    mine = features.clone().requires_grad_()
    roi_align(mine, per_image, 5, 1 / 16, sampling_ratio, aligned).backward(grad_out)
    ref = features.clone().requires_grad_()
    out = tv_roi_align(ref, per_image, 5, 1 / 16, sampling_ratio, aligned)
    out.backward(grad_out)
    assert torch.equal(roi_align(features, per_image, 5, 1 / 16, sampling_ratio, aligned), out.detach())
    torch.testing.assert_close(mine.grad, ref.grad, rtol=0, atol=1e-5)
