"""The MERaLiON-SER training recipe: `serval train CONFIG.yaml [--set key=value ...]`.

One `TrainConfig` holds every knob. The loop: length-bucketed, seeded, resumable batches ->
waveform augmentation (speed, noise) -> MixUp -> log-mel -> model -> 1.0 * weighted CE (label
smoothing 0.1) + 0.5 * CCC -> AdamW (LoRA and downstream groups) with cosine warm-up.
Each epoch ends with a dev evaluation; the 4 best checkpoints by dev categorical loss are kept
and combined into the final model (averaged predictions or averaged weights).

Two modes:
- `lora`: Whisper frozen, LoRA adapters on q/k/v trained with the downstream network (the paper).
- `frozen_cached`: the whole encoder frozen; its outputs are computed once per clip, stored by
  `serval.train.cache`, and only the downstream network trains (the CPU path).

Runs on one device, or on many through `torchrun` (DDP). Every random draw is seeded by
(seed, epoch, clip) or (seed, step, rank), so a run resumed after a crash continues exactly.

Modules: `config` (settings), `losses`, `augment`, `cache` (the encoder-output cache), `data`
(examples, datasets, the encoder cache fill), `sampler`, `ddp`, `network` (the model trained), `optim`,
`scoring` (dev/test figures), `checkpoint` (what a checkpoint holds, weight averaging), `folder` (the
run's output folder), `select` (selection, the final model), `loop` (`train`), `command` (the CLI).
"""

from serval.train.augment import NoiseBank, add_noise, augment_features, augment_wave, change_speed, mixup
from serval.train.checkpoint import average_models, load_checkpoint
from serval.train.config import (
    AugmentConfig,
    CacheConfig,
    DataConfig,
    LossConfig,
    OptimConfig,
    SelectConfig,
    TrainConfig,
    from_dict,
    load_config,
    set_value,
)
from serval.train.data import (
    CachedDataset,
    ClipDataset,
    Example,
    balance_weights,
    check_rows,
    collate,
    crop,
    load_example,
    prepare_cache,
    read_split,
)
from serval.train.ddp import Dist, setup_distributed
from serval.train.folder import MetricsLog, Run, RunState
from serval.train.loop import claim_folder, load_splits, restore, setup, train, train_step
from serval.train.losses import (
    ccc_loss,
    class_weights_for,
    class_weights_from_labels,
    soft_cross_entropy,
    total_loss,
)
from serval.train.network import build, build_model, zero_init_residual
from serval.train.optim import cosine_with_warmup, make_optimizer
from serval.train.sampler import BucketBatchSampler
from serval.train.scoring import evaluate_split, score_outputs, split_outputs
from serval.train.select import choose_combination, finish, select_after_epoch

__all__ = [
    "AugmentConfig", "BucketBatchSampler", "CacheConfig", "CachedDataset", "ClipDataset", "DataConfig", "Dist",
    "Example", "LossConfig", "MetricsLog", "NoiseBank", "OptimConfig", "Run", "RunState", "SelectConfig",
    "TrainConfig", "add_noise", "augment_features", "augment_wave", "balance_weights", "average_models", "build",
    "build_model", "ccc_loss", "change_speed", "check_rows", "choose_combination", "claim_folder", "class_weights_for", "class_weights_from_labels", "collate",
    "cosine_with_warmup", "crop", "evaluate_split", "finish", "from_dict", "load_checkpoint", "load_config",
    "load_example", "load_splits", "make_optimizer", "mixup", "prepare_cache", "read_split", "restore",
    "score_outputs", "select_after_epoch", "set_value", "setup", "setup_distributed", "soft_cross_entropy",
    "split_outputs", "total_loss", "train", "train_step", "zero_init_residual",
]  # fmt: skip
