"""Hyperparameter search over tftransfer fine-tuning: `python -m tftransfer.search`.

    python -m tftransfer.search --config tuner_configs/quickstart.yaml
        [--data SOURCE] [--backbone A[,B...]] [--image-size N | H,W] [--per-class N]
        [--tuner random|bayesian|hyperband|grid]
        [--max-trials N] [--epochs N | HEAD,FINE_TUNE] [--directory DIR]
        [--export-dir DIR] [--strategy none|auto|mirrored|multi_worker|one_device] [--overwrite]
        [--workers N] [--verbose]

Each trial builds a model with `build_finetuner` and runs the two-stage
`fine_tune`; KerasTuner keeps the best epoch's objective (`val_accuracy`
by default). One line is printed per trial, then the ranked table. The
search directory holds `config.yaml`, the trials, `trials.csv` (one row per
trial, rewritten as each ends), `tensorboard/` (each trial's scalars and
the HParams dashboard: `tensorboard --logdir <directory>/tensorboard`),
`report.md`, `report.html` (a sortable trial table and each hyperparameter
against the objective), `trials.png`,
`best_hyperparameters.yaml` (`build_finetuner:` and `fine_tune:` sections,
usable as `**kwargs`), `features/` (the frozen backbone's features, computed
by the first trial and read by the others) and `export/<version>/` (TF
Serving). Rerunning the same command resumes, also after a kill (state
files are renamed into place); a changed config or other data is refused
unless `--overwrite`, and a directory another search is using is refused
(exit 2, `LockedError` naming its PID). A config that cannot run exits 2 with
a `ConfigError` in the package's one error format, naming the key path:
"`run.strategy` must be one of 'none', ... Received: run.strategy='tpu'". Each backbone choice is loaded on
the configured image size before anything is written. Each trial is seeded
from `tuner.seed` and its values, so the same config gives the same scores.

Config (YAML; every key optional except `search_space.backbone`):

    data:          source: digits | <folder> | tfds:<name>      (digits)
                   classes: [5, 6, 7, 8, 9]   per_class: N      (digits only)
                   image_size: N | [H, W]  (32 digits, else 224)  channels: 1 | 3
                   validation_split: 0.2   seed: 0
    search_space:  each knob a value, {choice: [...]}, {min, max, sampling:
                   linear|log, step} or {int_min, int_max, step}:
                   backbone (a list = choice), unfreeze ("none"|"all"|"top:N"|
                   "fraction:F"; int range = top:N, float range = fraction:F;
                   the freeze policy of stage 2, `fine_tune(unfreeze=...)`;
                   default "all"; formerly `trainable`), optimizer (adam),
                   learning_rate (1e-3), schedule (constant|cosine|warmup_cosine),
                   regularizer_kind (none|l1|l2|l1_l2), regularizer_strength (1e-4),
                   dropout (0), hidden_units ([] ; choices are lists),
                   label_smoothing (0), batch_size (32, per replica),
                   head_epochs (5), fine_tune_epochs (3), layerwise_lr_decay
                   (auto: 30x over the backbone | 0-1 | null), lr_factor (0.03),
                   fine_tune_warmup (2.0 epochs), fine_tune_ema (auto: a
                   weight average over 40% of stage 2 | epochs | null)
    tuner:         kind: random|bayesian|hyperband|grid  max_trials: 10
                   objective: val_accuracy | {name: val_auc, direction: max}
                   (val_/train loss, accuracy, auc, macro_f1,
                   precision_at_recall (at recall 0.8); the metric is compiled
                   into each model; direction min for losses, else max)
                   executions_per_trial: 1
                   seed: 0  max_consecutive_failed_trials: 3
                   max_epochs: 10  factor: 3  (hyperband: total epoch budget)
    run:           directory: searches/search   export_dir: <directory>/export
                   strategy: none|auto|mirrored|multi_worker|one_device (global batch =
                   batch_size x replicas)   isolate_trials: true (trials run
                   in worker processes that import TensorFlow once; a worker
                   leaves after worker_max_trials: 10 trials or once its RSS
                   grew worker_max_rss_growth_mb: 1024 (null: no limit), so
                   memory stays flat; a worker that dies fails its trial and
                   a new one goes on; false runs trials in this process)
                   dtype_policy: float32|mixed_float16|mixed_bfloat16
                   jit_compile: auto|true|false   (build_finetuner's)
                   max_time: null | seconds (no trial starts once this run
                   has lasted that long; running ones finish, the best is
                   exported)   stop_after: null | N (stop after N trials in
                   a row without a better objective)
                   multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG;
                   run the same command on every worker. Each trial trains
                   on all workers in sync (trials run in-process, the same
                   seed gives every worker the same trials); the chief writes
                   the search directory, report and export, the others keep
                   their state in <directory>/workers/<task>-<index>.

Example:

>>> from tftransfer.search import load_config, run
>>> result = run(load_config("tuner_configs/quickstart.yaml"))
>>> result["best"]["score"], result["export"]
"""

from tftransfer._lock import LockedError
from tftransfer.search.config import ConfigError, load_config, validate
from tftransfer.search.runner import DirectoryError, run

__all__ = ["ConfigError", "DirectoryError", "LockedError", "load_config", "run", "validate"]
