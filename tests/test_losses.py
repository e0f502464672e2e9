"""The losses cover exactly the regions docs/method.md gives."""

from __future__ import annotations

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
