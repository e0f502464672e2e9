"""The losses cover exactly the regions docs/method.md gives."""

from __future__ import annotations

import pytest
import torch

from defectfill.train.losses import attention_loss, combine, defect_loss, object_loss


def _setup():
    torch.manual_seed(0)
    eps = torch.randn(2, 4, 8, 8)
    pred = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:6] = 1
    return eps, pred, mask


def test_defect_loss_ignores_everything_outside_the_mask():
    eps, pred, mask = _setup()
    changed = pred + (1 - mask) * 10.0
    assert torch.equal(defect_loss(eps, pred, mask), defect_loss(eps, changed, mask))
    inside = pred + mask * 1.0
    assert not torch.equal(defect_loss(eps, pred, mask), defect_loss(eps, inside, mask))


def test_defect_loss_is_the_mean_over_the_defect_region():
    eps, pred, mask = _setup()
    expected = torch.stack([((eps[i] - pred[i]) ** 2)[:, 2:5, 3:6].mean() for i in range(2)]).mean()
    torch.testing.assert_close(defect_loss(eps, pred, mask), expected)


def test_object_loss_weights_background_by_alpha():
    eps, pred, mask = _setup()
    alpha = 0.3
    w = mask + alpha * (1 - mask)
    expected = torch.stack([(w[i] * (eps[i] - pred[i]) ** 2).sum() / (4 * w[i].sum()) for i in range(2)]).mean()
    torch.testing.assert_close(object_loss(eps, pred, mask, alpha), expected)
    # the background counts (unlike L_def), with less weight than the defect
    bg = object_loss(eps, pred + (1 - mask), mask, alpha) - object_loss(eps, pred, mask, alpha)
    assert bg.abs() > 0
    assert object_loss(eps, pred, mask, 0.0) == defect_loss(eps, pred, mask)


def test_attention_loss_against_area_resized_mask():
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, :32, :32] = 1
    perfect = torch.zeros(1, 4, 4)
    perfect[:, :2, :2] = 1
    assert attention_loss(perfect, mask) == 0
    assert attention_loss(1 - perfect, mask) == 1


def test_combine_uses_the_weights():
    t = combine(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0), 0.5, 0.2, 0.05)
    assert t.total == 0.5 + 0.4 + 0.2


def test_empty_latent_mask_gives_zero_not_nan():
    eps, pred, _ = _setup()
    assert defect_loss(eps, pred, torch.zeros(2, 1, 8, 8)) == 0


def test_object_loss_gives_letterbox_padding_no_weight():
    """Pins L_obj on a letterboxed reference: cells on the padding (valid 0) weigh nothing, the defect still counts."""
    eps, pred, mask = _setup()
    valid = torch.ones(2, 1, 8, 8)
    valid[:, :, 6:] = 0  # two padding rows
    changed = pred.clone()
    changed[:, :, 6:] += 10.0
    assert torch.equal(object_loss(eps, pred, mask, 0.3, valid), object_loss(eps, changed, mask, 0.3, valid))
    assert object_loss(eps, pred, mask, 0.3, torch.ones_like(valid)) == object_loss(eps, pred, mask, 0.3)
    w = mask + 0.3 * (1 - mask) * valid
    expected = torch.stack([(w[i] * (eps[i] - pred[i]) ** 2).sum() / (4 * w[i].sum()) for i in range(2)]).mean()
    torch.testing.assert_close(object_loss(eps, pred, mask, 0.3, valid), expected)


def _thin_line_mask(size: int = 512) -> torch.Tensor:
    """(1, 1, size, size): a 1 px diagonal line across the middle third."""
    mask = torch.zeros(1, 1, size, size)
    for i in range(size // 3, 2 * size // 3):
        mask[0, 0, i, i] = 1.0
    return mask


def test_the_attention_target_of_a_thin_defect_is_reachable_by_a_max_normalised_map():
    """A max-normalised map that lights exactly the cells a 1 px line crosses must score better than an empty map
    (with the plain area-resized target, whose peak is 0.03 at 16 x 16, the empty map won)."""
    from defectfill.train.losses import attention_loss, attention_target

    mask = _thin_line_mask()
    target = attention_target(mask, (16, 16))
    assert float(target.max()) == pytest.approx(1.0)
    lit = (target > 0).float()  # (1, 16, 16): 1 on every crossed cell
    assert attention_loss(lit, mask) < attention_loss(torch.zeros_like(lit), mask)
    assert float(attention_loss(target, mask)) == pytest.approx(0.0, abs=1e-12)


def test_the_attention_maps_default_to_the_coarsest_decoder_cross_attention_grid():
    """SD2 at 512 px (64 latent, cross-attention in 3 of 4 up blocks): 16; defectfill-mini at 64 px (16 latent,
    2 of 3): 8; a UNet with cross-attention in every up block: latent / 2^(n-1)."""
    from types import SimpleNamespace

    from defectfill.model.attention import coarsest_cross_attention_side

    def unet(types):
        return SimpleNamespace(config=SimpleNamespace(up_block_types=types))

    sd2 = unet(("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    mini = unet(("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    assert coarsest_cross_attention_side(sd2, 64) == 16
    assert coarsest_cross_attention_side(mini, 16) == 8
    assert coarsest_cross_attention_side(unet(("CrossAttnUpBlock2D",) * 3), 16) == 4


def test_attention_consistency_is_zero_when_the_grids_agree_and_positive_when_not():
    from defectfill.train.losses import attention_consistency, multi_scale_attention_loss

    coarse = torch.zeros(1, 2, 2)
    coarse[0, 0, 0] = 1.0
    fine_agree = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)  # the same map on the 4x4 grid
    assert float(attention_consistency([coarse, fine_agree])) == 0.0
    fine_other = torch.zeros(1, 4, 4)
    fine_other[0, 3, 3] = 1.0  # its peak in the opposite corner
    assert float(attention_consistency([coarse, fine_other])) > 0.1
    assert float(attention_consistency([coarse])) == 0.0
    mask = fine_agree[:, None]  # (1, 1, 4, 4): the coarse map's cell
    # the coarse map and the agreeing fine map both equal the mask at their grid: loss 0; the other fine map not
    assert float(multi_scale_attention_loss([coarse, fine_agree], mask)) == 0.0
    half = float(multi_scale_attention_loss([coarse, fine_other], mask))
    assert half == pytest.approx(float(attention_loss(fine_other, mask)) / 2)
