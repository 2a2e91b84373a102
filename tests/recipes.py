"""The tiny training recipes the tests share, chosen far from the edge of divergence.

Float results differ between CPU kernel sets (ATEN_CPU_CAPABILITY=default|avx2|avx512): a run near
the edge stays finite on one machine and blows up on another. Measured on all three kernel sets,
seeds 0-2, 3 epochs of 6 steps (24 generated images, batch 4, warm-up 1 epoch):

- squeezenet_cbn --weight mean stays finite up to lr 0.5 and first diverges at lr 1, so the
  recipe's STABLE_LR trains 25x below that edge;
- squeezenet_nobn diverges in its first epoch already at lr 0.02, so at HOT_LR it diverges 5x
  above its edge while the MimicNorm twin trains 5x below its own.

`test_margins.py` keeps these margins checked (under every kernel set, see `test_kernel_sets.py`).
"""
from __future__ import annotations

STABLE_LR = 0.02  # every test that assumes training stays finite
# --amp fp16: under a last BN on batches of 4 the body's output grows step by step (17 -> 17,000
# in 12 steps at STABLE_LR), near float16's 65,504; at FP16_LR it stays below 40.
FP16_LR = 0.002
HOT_LR = 0.1  # the divergence test: no normalisation diverges, MimicNorm trains
MARGIN_LRS = {"cbn_finite": 0.2, "nobn_diverges": 0.02}  # what test_margins.py checks

# squeezenet_cbn, 24 train / 8 test generated images, batch 4: 6 steps per epoch.
TINY = ["-a", "squeezenet_cbn", "--weight", "mean", "-ds", "synthetic", "--synthetic-size", "24",
        "8", "-b", "4", "-lr", str(STABLE_LR), "--gpu", "-1", "--no-progress", "--warm", "1",
        "--milestones", "2"]
TINY_STEPS = 6
