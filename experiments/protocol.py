"""The two protocols of the study: the authors' released scripts (``released``) and the paper's text
(``paper``), each value once, as a named constant.

Every value read from the released code (``youweiliang/norm_robustness``) carries a comment
``# released: <file>:<line>`` (and, where the value is not a plain number on that line, the text
that sets it in parentheses); ``tests/experiments/test_protocol.py`` reads those comments and, where
a copy of the released code is present, checks each value against that very line.

The paper's text (Liang & Huang, AAAI 2021, Algorithm 1) disagrees with the released code in three
places: the norm-decay rule (``h <- gamma h + (1 - gamma) p``, ``grad += beta / N * h``), the
batch-norm projection (a projection: every channel capped, after the step) and which layers are
regularized (every conv and linear layer; the released code skips grouped convolutions and
convolutions whose input is smaller than the kernel's footprint). Everywhere else the text states
no other value, so ``paper`` uses the released one. The released layer skipping is an option in
both protocols (``--released-skips``), off by default: the skipped layers are real layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

# --- norm decay -------------------------------------------------------------------------------
GAMMA = 0.5  # released: lip/add_lip.py:10
BETAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # released: train_nd.py:253
BETAS_LINF = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # released: train_nd_inf.py:245
BETAS_L1_BN = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # released: train_nd_proj_bn.py:246
BETAS_LINF_BN = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # released: train_nd_inf_proj_bn.py:246
BN_RADIUS = 5.0  # released: train_nd_proj_bn.py:71
# Only the arg-max channel is moved to the radius, after add_lip_grad, before optimizer.step().
BN_PROJECTION = "released"  # released: train_nd_proj_bn.py:71 (model.project_bn)
NORM_DECAY_RULE = "reference"  # released: lip/add_lip.py:10 (MMT)
# Grouped convs and convs whose input the kernel cannot cover are skipped (is_conv2d, check_size).
SKIP_LAYERS = "released"  # released: lip/add_lip.py:485 (layer.groups == 1)

# --- the other regularizers -------------------------------------------------------------------
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # released: train_wd.py:240
SVC_BOUNDS = (2.0, 1.5, 1.0, 0.5, 0.1)  # released: train_svc.py:249
SVC_EVERY = 100  # released: train_svc.py:206
# Clip before the optimizer step when the epoch's batch index (from 0) is 1 modulo SVC_EVERY: the
# count restarts every epoch (4 clips per CIFAR-10 epoch of 391 batches; 1 per digits epoch).
SVC_TIMING = "released"  # released: train_svc.py:70 (batch_idx % args.clip_freq == 1)
# Each conv clipped as a circular convolution on its raw input size (no padding added).
SVC_INPUT_SIZE = "raw"  # released: regularization/conv2d_sv.py:88 (h, w = m.inp_shape)

# --- optimisation (regularization study) --------------------------------------------------------
LR = 0.01  # released: train_nd.py:188
MOMENTUM = 0.9  # released: train_nd.py:190
BATCH_SIZE = 128  # released: train_nd.py:180
SEED = 1  # released: train_nd.py:194
EPOCHS = 120  # released: run_norm_regularization.sh:4
# First (1-based) epoch trained at lr x0.1, x0.01, x0.001: the lr is set before each epoch.
LR_DROP_1 = 75  # released: train_nd.py:118
LR_DROP_2 = 90  # released: train_nd.py:116
LR_DROP_3 = 100  # released: train_nd.py:114
LR_DROPS = (LR_DROP_1, LR_DROP_2, LR_DROP_3)
# ...and set before each epoch, epochs counted from 1.
LR_SET_BEFORE_EPOCH = True  # released: train_nd.py:140 (adjust_learning_rate(optimizer, epoch))

# --- evaluation ---------------------------------------------------------------------------------
EVAL_IMAGES = 1024  # released: train_nd.py:200 (128*8)
# The first batch of a shuffled loader: a random subset, drawn with the run's seed here.
EVAL_SUBSET = "random"  # released: train_nd.py:237 (shuffle=True)
# Clean accuracy: test() over the whole test set, every epoch.
CLEAN_ON = "full"  # released: train_nd.py:236 (shuffle=False)
ATTACKS = ("apgd-ce", "apgd-t")  # released: train_nd.py:150 (['apgd-ce', 'apgd-t'])
EVAL_EPS_REGULARIZE = 1.0  # released: train_nd.py:149 (eps=1/255)
EVAL_EPS_ADVERSARIAL = 8.0  # released: train_adv_cifar10.py:164 (eps=8/255)

# --- adversarial training -------------------------------------------------------------------------
ADV_LR = 0.1  # released: train_adv_cifar10.py:205
PLAIN_LR_ADVERSARIAL = 0.1  # released: train_plain_cifar10.py:178
ADV_EPS = 0.031  # released: train_adv_cifar10.py:211
ADV_STEPS = 10  # released: train_adv_cifar10.py:213
ADV_STEP = 0.007  # released: train_adv_cifar10.py:215
ADV_SEED = 1  # released: train_adv_cifar10.py:218
TRADES_BETA = 1.0  # released: train_adv_cifar10.py:217
ALP_WEIGHT = 1.0  # released: AT/losses.py:112
ALP_PAIRING = "mse"  # released: AT/losses.py:153 (F.mse_loss(logits, logits_adv))
ATTACK_START_STD = 0.001  # released: AT/losses.py:79
# Adversarial training combined with norm decay (l1) or weight decay: the released scripts train ALP
# only; their strength comes from the command line (default 0), so normopt's grids are its own.
AT_REGULARIZED_LOSS = "alp"  # released: AT/train_adv_cifar10_nd.py:284 (for los in ['alp'])
AT_WD_LOSS = "alp"  # released: AT/train_adv_cifar10_wd.py:284 (for los in ['alp'])
AT_ND_ORD = 1  # released: AT/train_adv_cifar10_nd.py:127 (norm='1-norm')
HE_SCALE = 15.0  # released: train_adv_cifar10.py:234
HE_MARGIN = 0.2  # released: train_adv_cifar10.py:233

# --- what normopt did before the protocol switch (the README's difference table) ----------------
OLD_TRADES_BETA = 6.0
OLD_ALP_WEIGHT = 0.5  # with the pairing 0.5 * sum over classes, mean over the batch
OLD_WEIGHT_DECAYS = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2)

PROTOCOLS = ("released", "paper")


@dataclass(frozen=True)
class Protocol:
    """The resolved values of one protocol: what a run records in its configuration."""

    name: str
    norm_decay_rule: str  # "reference" (released) or "paper" (Algorithm 1)
    bn_projection: str  # "released" (arg-max channel, before the step) or "exact" (every channel, after)
    skip_layers: str  # "released" (grouped convs, convs on inputs smaller than the kernel) or "none"
    norm_decay_gamma: float = GAMMA
    trades_beta: float = TRADES_BETA
    alp_weight: float = ALP_WEIGHT
    alp_pairing: str = ALP_PAIRING  # "mse": mean over all elements; "sum": sum over classes, mean over batch
    attack_start: str = "normal"  # "normal": x + 0.001 N(0, 1); "uniform": uniform in the ball
    he_scale: float = HE_SCALE
    he_margin: float = HE_MARGIN

    def options(self) -> dict:
        """The run-configuration fields this protocol sets."""
        return {
            "protocol": self.name,
            "norm_decay_rule": self.norm_decay_rule,
            "bn_projection": self.bn_projection,
            "skip_layers": self.skip_layers,
            "norm_decay_gamma": self.norm_decay_gamma,
            "trades_beta": self.trades_beta,
            "alp_weight": self.alp_weight,
            "alp_pairing": self.alp_pairing,
            "attack_start": self.attack_start,
            "he_scale": self.he_scale,
            "he_margin": self.he_margin,
        }


# Layer skipping stays an option (--released-skips) in both: the skipped layers are real layers.
RELEASED = Protocol("released", NORM_DECAY_RULE, BN_PROJECTION, "none")
PAPER = Protocol("paper", "paper", "exact", "none")


def protocol(name: str) -> Protocol:
    """A protocol by name; ``ValueError`` naming the known ones otherwise."""
    found = {"released": RELEASED, "paper": PAPER}.get(name)
    if found is None:
        raise ValueError(f"unknown protocol {name!r}; choose from {list(PROTOCOLS)}")
    return found


def released_skips(model: nn.Module, specs) -> dict[str, str]:
    """Conv layers the released code leaves alone, with the reason: grouped, dilated or not
    zero-padded convs, and convs whose input the kernel cannot cover on some axis
    (``k + ceil(p / s) * s - p > n``, the released ``check_size``), e.g. VGG's last convs on 2x2.

    Args:
        model: the network.
        specs: its ``normopt.layer_specs`` (input sizes recorded).
    """
    skipped = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or name not in specs:
            continue
        spec = specs[name]
        if module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros":
            skipped[name] = "grouped, dilated or not zero-padded (released is_conv2d)"
            continue
        size = spec.input_size
        if size is None:
            continue
        for n, k, s, (p, _) in zip(size, spec.kernel_size, spec.stride, spec.padding):
            if k + math.ceil(p / s) * s - p > n:
                skipped[name] = f"input {tuple(size)} not covered by the kernel (released check_size)"
                break
    return skipped
