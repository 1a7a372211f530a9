"""The `blo_sam_reference` recipe holds the released BLO-SAM script's constants, each pinned here.

"The script" is BLO-SAM's `train.py` (argparse defaults), `train.sh` (the command it ships),
`trainer.py` (lower optimiser and loop), `prompt.py` (prompt optimiser, finite differences) and
`sam_lora_mask_decoder.py` (LoRA). A recipe constant that drifts from the script fails here, and
the optimisers built from the recipe are checked against torch's AdamW driven exactly as the
script drives it (OneCycleLR constructed and never stepped, the poly lr written after each step).
"""

import math

import numpy as np
import optax
import pytest

from amsam_jax.fewshot.blo import make_step
from amsam_jax.fewshot.recipes import blo_sam_reference
from amsam_jax.fewshot.trainer import schedules, step_config

# (config path, the script's value, where the script sets it)
CONSTANTS = [
    ("seed", 42, "train.py: --seed default 42"),
    ("train.epochs", 100, "train.sh: --max_epoch 100 (train.py default 100)"),
    ("train.batch_size", 1, "train.sh: --batch_size 1"),
    ("train.lower_lr", 5e-3, "train.sh: --base_lr 5e-3 (train.py default 0.005)"),
    ("train.upper_lr", 5e-3, "train.sh: --prompt_base_lr 5e-3 (train.py default 0.005)"),
    ("train.weight_decay", 0.1, "train.py: --weight_decay 0.1 and --prompt_weight_decay 0.1"),
    ("train.b1", 0.9, "trainer.py AdamW betas=(0.9, 0.999); prompt.py self.beta1 = 0.9"),
    ("train.b2", 0.999, "trainer.py AdamW betas=(0.9, 0.999); prompt.py self.beta2 = 0.999"),
    ("train.eps", 1e-8, "torch.optim.AdamW default eps; prompt.py's virtual step adds 1e-8"),
    ("train.power", 0.9, "trainer.py and prompt.py: (1.0 - iter / max_iterations) ** 0.9"),
    ("train.schedule", "reference", "trainer.py: OneCycleLR never stepped, poly after the step"),
    ("train.warmup", False, "train.sh passes no --warmup (store_true)"),
    ("train.warmup_period", 250, "train.py: --warmup_period default 250"),
    ("train.upper_batch", "first", "trainer.py: valid_batch = next(iter(validloader))"),
    ("train.dice_weight", 0.8, "train.sh: --dice_param 0.8"),
    ("train.hypergradient", "first_order", "train.sh: '# --unrolled' is commented out"),
    ("train.fd_radius", 0.01, "prompt.py: _hessian_vector_product(..., r=1e-2)"),
    ("train.fd_accumulate_bug", True, "prompt.py: loss.backward() onto the stored step gradient"),
    ("train.fd_step1_bias", True, "prompt.py: bias_correction1 = 1 - self.beta1 (step 1)"),
    ("train.fd_reference_b1", True, "prompt.py: the virtual step's hard-coded beta1 0.9"),
    ("train.fd_final_attn_quirk", True, "prompt.py: _construct_model_from_theta reload"),
    ("lora.rank", 4, "train.sh: --rank 4"),
    ("lora.alpha", None, "sam_lora_mask_decoder.py: proj(x) + w_b(w_a(x)), no scaling"),
    # The IoU head requires grad in the script but is not in the loss: its grad stays None and
    # torch's AdamW skips it (no decay either), so it never changes; frozen here is the same.
    ("lora.train_iou_head", False, "trainer.py: calc_loss uses low_res_logits only"),
    ("sam.image_size", 256, "train.py: --img_size default 256"),
    ("sam.num_classes", 1, "train.sh: --num_classes 1"),
    ("sam.reinit_heads", True, "segment_anything build_sam(num_classes=...) skips the heads"),
    ("sam.head_init", "tokens", "DiceLoss(num_classes + 1) over the mask tokens' logits"),
    ("data.sam_pixel_norm", False, "train.py: pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1]"),
    ("calibration.enabled", False, "BLO-SAM has no mask calibration"),
]


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize(("path", "value", "where"), CONSTANTS, ids=[c[0] for c in CONSTANTS])
def test_recipe_constant_is_the_scripts(path, value, where):
    assert _get(blo_sam_reference(), path) == value, f"{path}: the script has {value} ({where})"


def test_step_config_carries_the_constants():
    """The constants reach the compiled step unchanged."""
    cfg = blo_sam_reference()
    sc = step_config(cfg)
    assert (sc.hypergradient, sc.dice_weight, sc.weight_decay) == ("first_order", 0.8, 0.1)
    assert (sc.b1, sc.b2, sc.eps, sc.fd_radius) == (0.9, 0.999, 1e-8, 0.01)
    assert not sc.calibration
    assert sc.fd_accumulate_bug and sc.fd_step1_bias and sc.fd_reference_b1
    assert sc.fd_final_attn_quirk


def test_reference_schedules():
    """trainer.py / prompt.py: lr_ = base_lr * (1 - iter_num / T) ** 0.9 written after step
    iter_num; the prompt's first step uses prompt_base_lr, later ones the lower base_lr."""
    total = 200
    lower, upper, b1 = schedules(blo_sam_reference(), total)
    assert b1 == 0.95  # OneCycleLR(max_momentum=0.95) sets the lower betas[0] at construction
    assert math.isclose(float(lower(0)), 5e-3 / 25, rel_tol=1e-6)  # OneCycleLR's initial lr
    assert math.isclose(float(upper(0)), 5e-3, rel_tol=1e-6)  # prompt_base_lr
    for k in (1, 2, 57, 199):
        expected = 5e-3 * (1 - (k - 1) / total) ** 0.9
        assert math.isclose(float(lower(k)), expected, rel_tol=1e-6), k
        assert math.isclose(float(upper(k)), expected, rel_tol=1e-6), k


@pytest.mark.slow
def test_optimisers_match_torch_driven_like_the_script():
    """The recipe's optax optimisers against torch.optim.AdamW for 4 iterations, torch driven as
    trainer.py and prompt.py drive it; a wrong lr, beta, eps or decay moves the result >1e-4."""
    import torch

    cfg = blo_sam_reference()
    total = 8  # T = max_epochs * len(trainloader)
    lower_lr, upper_lr, lower_b1 = schedules(cfg, total)
    _, lower_tx, upper_tx = make_step(None, step_config(cfg), lower_lr, upper_lr, lower_b1)

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(6, 5)).astype(np.float32)
    a0 = rng.normal(size=(1, 5)).astype(np.float32)
    grads = [
        (rng.normal(size=w0.shape).astype(np.float32), rng.normal(size=a0.shape).astype(np.float32))
        for _ in range(4)
    ]

    tw = torch.nn.Parameter(torch.tensor(w0))
    ta = torch.nn.Parameter(torch.tensor(a0))
    lower_opt = torch.optim.AdamW([tw], lr=5e-3, betas=(0.9, 0.999), weight_decay=0.1)
    torch.optim.lr_scheduler.OneCycleLR(lower_opt, max_lr=5e-3, total_steps=total)  # unused
    prompt_opt = torch.optim.AdamW([ta], lr=5e-3, betas=(0.9, 0.999), weight_decay=0.1)

    w, a = w0.copy(), a0.copy()
    w_state, a_state = lower_tx.init(w), upper_tx.init(a)
    for k, (gw, ga) in enumerate(grads):
        tw.grad, ta.grad = torch.tensor(gw), torch.tensor(ga)
        lower_opt.step()
        prompt_opt.step()
        for group in (*lower_opt.param_groups, *prompt_opt.param_groups):
            group["lr"] = 5e-3 * (1.0 - k / total) ** 0.9

        upd, w_state = lower_tx.update(gw, w_state, w)
        w = np.asarray(optax.apply_updates(w, upd))
        upd, a_state = upper_tx.update(ga, a_state, a)
        a = np.asarray(optax.apply_updates(a, upd))
        np.testing.assert_allclose(w, tw.detach().numpy(), rtol=0, atol=2e-6, err_msg=f"w {k}")
        np.testing.assert_allclose(a, ta.detach().numpy(), rtol=0, atol=2e-6, err_msg=f"a {k}")
    assert lower_opt.param_groups[0]["betas"][0] == 0.95  # the side effect the schedule models
