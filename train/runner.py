"""The one training loop both stages plug into (`run_stage(Stage)`), and what it is made of: the Accelerator,
the run state, data order, checkpoints, metrics, the fixed evaluation.

A stage (`train/anchor.py`, `train/reconfigure.py`) builds its models and hands over a `Stage`: the module that
holds what is trained, its samples, the batch -> losses function, and how its weights are saved and loaded. The
accelerate sequence (prepare, save/load hooks, resume, evaluation cadence, sample images, checkpoints, final
weights) is written here once.

A run folder holds `config.yaml` (resolved settings), `checkpoints/checkpoint-<step>/` (accelerate's optimizer,
scheduler and RNG states; the run state as `run_state.json` + `generators.safetensors`; `weights.safetensors`
in the project's format: nothing there is unpickled with code execution on resume), `weights.safetensors`
(the final weights), `logs/metrics.jsonl` (every logged value) and TensorBoard events under `logs/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynamicid.clitools import one_line
from dynamicid.locks import hold_folder
from dynamicid.models import load_dynamicid, save_dynamicid
from dynamicid.models.base import BaseModel, load_base_model
from dynamicid.models.layerwise import store_weights
from dynamicid.schemas import CheckpointMetadata
from dynamicid.train.config import TrainConfig, write_config

CHECKPOINTS = "checkpoints"
WEIGHTS = "weights.safetensors"
RUN_STATE = "run_state.json"
GENERATORS = "generators.safetensors"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# What a checkpoint folder may hold: ours (JSON, safetensors) and accelerate's torch.save pickles, which it loads
# with weights_only=True and `check_checkpoint` scans first. Anything else is refused on resume.
_OURS = {WEIGHTS, RUN_STATE, GENERATORS}
_ACCELERATE_PICKLES = re.compile(r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt)$")


def make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(config.output_dir)
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision


def weight_dtype(accelerator: Any) -> torch.dtype:
    """The dtype of the frozen parts: the mixed-precision type; trained parameters stay float32."""
    return PRECISION_DTYPES.get(accelerator.mixed_precision, torch.float32)


class RunState:
    """Step, data position and the training randomness (noise, timesteps, drops), saved in every checkpoint as
    JSON + safetensors (never pickled, so a resume runs no code from the checkpoint folder).

    Each process has its own generator (seed + process index); a checkpoint holds all of them.
    """

    def __init__(self, accelerator: Any, seed: int):
        self.accelerator = accelerator
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.generator = torch.Generator().manual_seed(seed * 1000 + accelerator.process_index)

    def save(self, folder: Path) -> None:
        """Called on every process (the generators are gathered); the main one writes."""
        from accelerate.utils import gather
        from safetensors.torch import save_file

        generators = gather(self.generator.get_state().to(self.accelerator.device)[None]).cpu()
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            position = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
            (folder / RUN_STATE).write_text(json.dumps(position) + "\n")
            save_file({"generators": generators.contiguous()}, str(folder / GENERATORS))

    def load(self, folder: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            position = json.loads((folder / RUN_STATE).read_text())
            self.step, self.epoch, self.batch_in_epoch = (int(position[k]) for k in ("step", "epoch", "batch_in_epoch"))
            generators = load_file(str(folder / GENERATORS))["generators"]
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            raise ValueError(
                f"--resume {folder}: its run state cannot be read ({one_line(error)}); resume from another checkpoint"
            ) from None
        if len(generators) != self.accelerator.num_processes:
            raise ValueError(
                f"the checkpoint was written by {len(generators)} process(es), this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes"
            )
        self.generator.set_state(generators[self.accelerator.process_index].clone())


def check_checkpoint(folder: Path) -> None:
    """Refuse (one line naming the file) anything in a checkpoint folder that dynamicid-train does not write, and
    any of accelerate's pickles that holds more than tensors, numbers and numpy arrays: checkpoints are copied
    between machines and shared, and a pickle can run code when loaded."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    for path in sorted(folder.iterdir()):
        refuse = f"--resume: {path} is not a file dynamicid-train writes into a checkpoint; remove it, or resume from another checkpoint"
        if path.name in _OURS and path.is_file():
            continue
        if not (_ACCELERATE_PICKLES.match(path.name) and path.is_file()):
            raise ValueError(refuse)
        try:
            with safe_globals(TORCH_SAFE_GLOBALS):
                unsafe = get_unsafe_globals_in_checkpoint(str(path))
        except (ValueError, RuntimeError, OSError) as error:
            raise ValueError(f"--resume: {path} is not a torch checkpoint file ({one_line(error)})") from None
        if unsafe:
            raise ValueError(
                f"--resume: {path} holds Python objects that would run code when loaded ({', '.join(unsafe[:3])}); "
                "it was not written by dynamicid-train: remove the checkpoint or resume from another"
            )


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation of the rows that depends only on (seed, epoch): resumes and every process agree on it."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.size).tolist())


def make_loader(samples: torch.utils.data.Dataset, config: TrainConfig, num_processes: int, collate_fn=None):
    """A shuffled loader; after `accelerator.prepare` each process gets a disjoint share of the batches."""
    batches = len(samples) // config.train_batch_size // num_processes
    if batches == 0:
        raise ValueError(
            f"the dataset gives {len(samples)} training samples, fewer than train_batch_size "
            f"({config.train_batch_size}) x processes ({num_processes}); lower --train-batch-size"
        )
    return torch.utils.data.DataLoader(
        samples,
        batch_size=config.train_batch_size,
        sampler=EpochShuffle(len(samples), config.seed),
        drop_last=True,
        num_workers=config.dataloader_num_workers,
        collate_fn=collate_fn,
    )


def epochs(accelerator: Any, loader: Any, state: RunState) -> Iterator[Any]:
    """Batches from the run state's data position on, across epochs, forever (the loop stops on max_steps)."""
    while True:
        loader.set_epoch(state.epoch)  # reaches the EpochShuffle sampler, sharded or not
        dataset = loader.dataset
        if hasattr(dataset, "epoch"):
            dataset.epoch = state.epoch
        skipped = state.batch_in_epoch
        batches = accelerator.skip_first_batches(loader, skipped) if skipped else loader
        for batch in batches:
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def make_optimizer(config: TrainConfig, parameters: list[nn.Parameter], num_processes: int):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    # The prepared scheduler steps once per process per optimizer step (accelerate's convention).
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_steps * num_processes,
    )
    return optimizer, scheduler


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_dir(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from: None (fresh run), the latest one, or the folder given."""
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = checkpoint_dirs(config.output_dir)
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (it has no {WEIGHTS})")
    return path


def save_checkpoint(accelerator: Any, config: TrainConfig, step: int) -> Path:
    """accelerate state + weights into checkpoints/checkpoint-<step>, keeping the last `checkpoints_total_limit`."""
    if accelerator.is_main_process and config.checkpoints_total_limit:
        existing = checkpoint_dirs(config.output_dir)
        for old in existing[: max(0, len(existing) - config.checkpoints_total_limit + 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    path = Path(config.output_dir) / CHECKPOINTS / f"checkpoint-{step}"
    partial = path.with_name(path.name + ".partial")  # renamed once complete: a Ctrl-C never leaves half of one
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
    accelerator.wait_for_everyone()
    return path


class Metrics:
    """Logged values: accelerate trackers (TensorBoard) and logs/metrics.jsonl, from the main process."""

    def __init__(self, accelerator: Any, config: TrainConfig, stage: str):
        self.accelerator = accelerator
        self.path = Path(config.output_dir) / "logs" / "metrics.jsonl"
        self.samples_path = Path(config.output_dir) / "logs" / f"samples-rank{accelerator.process_index}.txt"
        self.record_samples = config.record_samples
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            hparams = {k: ("" if v is None else v) for k, v in dataclasses.asdict(config).items()}
            accelerator.init_trackers(stage, config=hparams)

    def log(self, values: dict[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        self.accelerator.log(values, step=step)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")

    def record(self, step: int, rows: torch.Tensor) -> None:
        """The dataset rows this process trained on at `step` (with --record-samples)."""
        if self.record_samples:
            self.samples_path.parent.mkdir(parents=True, exist_ok=True)
            with self.samples_path.open("a") as handle:
                handle.write(f"{step} {' '.join(str(int(r)) for r in rows.flatten().tolist())}\n")


class Progress:
    """The main process's progress bar (step, loss, lr, it/s, ETA), as diffusers' training examples show it."""

    def __init__(self, accelerator: Any, config: TrainConfig, stage: str, step: int):
        from tqdm import tqdm

        from dynamicid.clitools import progress_options

        self.main = accelerator.is_local_main_process
        disable = not (self.main and config.progress)
        self.bar = tqdm(total=config.max_steps, initial=step, desc=stage, disable=disable, **progress_options())

    def update(self, values: dict[str, float]) -> None:
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        self.bar.update(1)

    def note(self, message: str) -> None:
        """A line above the bar (also without it: --no-progress runs log a line per checkpoint)."""
        if self.main:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's logs/metrics.jsonl."""
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


RUN_FILES = ("config.yaml", WEIGHTS, CHECKPOINTS, "logs", "samples")  # what a run folder holds


def check_output_dir(config: TrainConfig) -> None:
    """A run already in output_dir is continued only with --resume and replaced only with --overwrite."""
    found = [name for name in RUN_FILES if (Path(config.output_dir) / name).exists()]
    if found and config.resume is None and not config.overwrite:
        raise FileExistsError(
            f"--output-dir {config.output_dir} already holds a run ({', '.join(found)}): give --resume latest to "
            f"continue it, --overwrite to replace it, or another --output-dir"
        )


def one_writer(train: Callable[..., Path]) -> Callable[..., Path]:
    """Decorates a stage's `train_*(config, ...)`: the run folder is locked while it runs (a second command on
    it stops at once, naming the holder), the `.partial` files and checkpoints a killed run left are removed,
    and a fresh run that fails before its first checkpoint leaves no run files behind, so the corrected command
    needs no --overwrite. Only the first process of a multi-process
    launch (RANK 0) locks and cleans."""

    @functools.wraps(train)
    def locked(config: TrainConfig, *args: Any, **kwargs: Any) -> Path:
        folder = Path(config.output_dir)
        if int(os.environ.get("RANK", "0")) != 0:
            return train(config, *args, **kwargs)
        fresh = not any((folder / name).exists() for name in RUN_FILES)  # (never remove an older run)
        with hold_folder(folder, f"--output-dir {folder}"):
            for partial in [*folder.glob("*.partial"), *folder.glob(f"{CHECKPOINTS}/*.partial")]:
                shutil.rmtree(partial) if partial.is_dir() else partial.unlink()  # left by a killed run
            try:
                return train(config, *args, **kwargs)
            except BaseException:
                if fresh and not checkpoint_dirs(folder):
                    remove_run_files(folder)  # and `hold_folder` removes the folder if it made it
                raise

    return locked


def remove_run_files(folder: Path) -> None:
    for name in RUN_FILES:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def start_run(accelerator: Any, config: TrainConfig) -> None:
    """Create the run folder (emptied of an old run with --overwrite) and write the resolved configuration."""
    if accelerator.is_main_process:
        folder = Path(config.output_dir)
        if config.overwrite:
            remove_run_files(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_config(config, folder / "config.yaml")
    accelerator.wait_for_everyone()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def start_stage(config: TrainConfig, base: BaseModel | None) -> tuple[Any, torch.dtype, BaseModel]:
    """(Accelerator, the frozen parts' dtype, the base) once the stage's inputs are checked: seeds, loads the base
    unless given, then makes the run folder (only once the inputs and the base model are fine)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    accelerator.print(accelerator.state)
    set_seed(config.seed)
    text_encoders = ("text_encoder", "text_encoder_2") if config.prompt_cache else ()  # the cache replaces them
    base = base or load_base_model(config.base_model, config.image_encoder, seed=config.seed, without=text_encoders)
    start_run(accelerator, config)
    return accelerator, weight_dtype(accelerator), base


def cast_frozen(
    base: BaseModel, model: nn.Module, device: torch.device, dtype: torch.dtype, base_dtype: str | None = None
) -> None:
    """Frozen parts to the device in the mixed-precision dtype; `model`'s trained weights stay float32. With
    `base_dtype` ("float8") the denoiser's frozen weights are then stored in it, computed in `dtype`."""
    for module in base.modules():  # every frozen part, SDXL's second text encoder included
        module.to(device) if dtype == torch.float32 else module.to(device, dtype=dtype)
    for p in trainable_parameters(model):
        p.data = p.data.float()
    if base_dtype is not None:
        store_weights(base.denoiser, base_dtype, dtype, training=True)


def clip_and_step(accelerator: Any, config: TrainConfig, parameters, optimizer, scheduler) -> None:
    if accelerator.sync_gradients and config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def mean_over_processes(accelerator: Any, value: torch.Tensor) -> float:
    return float(accelerator.gather(value.detach().float()[None]).mean())


Losses = Callable[[nn.Module, Any, torch.Generator, bool], dict[str, torch.Tensor]]


@dataclass
class Stage:
    """What a training stage plugs into `run_stage`.

    Args:
        name: the stage's name (trackers, progress bar).
        model: the module whose `requires_grad` parameters are trained; the losses call it.
        samples: the training samples; `collate_fn` batches them (None: torch's default).
        losses: (model, batch, generator, training) -> named scalar losses; "loss" is the one optimised, all are
            logged. `training` is False for the fixed evaluation (no condition drops).
        eval_samples: the samples the fixed evaluation takes its first `eval_samples` from.
        metadata: the weights' metadata (`dynamicid.models.save_dynamicid`).
        saved_parts: the modules of `model` that are saved, by `save_dynamicid` argument (face_encoder, unet for
            SAA, imr, keypoint_encoder); checkpoints and the final weights hold them, resumes load them strictly.
        batch_rows: the dataset rows of a batch (--record-samples).
        sample_images: images of the model as it is (main process, every --validation-steps).
        bench: --eval-manifest figures of the model at a step (main process; {} elsewhere).
    """

    name: str
    model: nn.Module
    samples: torch.utils.data.Dataset
    losses: Losses
    eval_samples: torch.utils.data.Dataset
    metadata: CheckpointMetadata
    saved_parts: Callable[[nn.Module], dict[str, nn.Module]]
    batch_rows: Callable[[Any], torch.Tensor]
    collate_fn: Callable[[list[Any]], Any] | None = None
    sample_images: Callable[[nn.Module], list[Any]] | None = None
    bench: Callable[[int, nn.Module], dict[str, float]] | None = None

    def save(self, model: nn.Module, path: Path) -> Path:
        return save_dynamicid(path, metadata=self.metadata, **self.saved_parts(model))

    def load(self, model: nn.Module, path: Path) -> None:
        load_dynamicid(path).load_into(**self.saved_parts(model))


class FixedEvaluation:
    """The stage's losses on fixed samples with fixed noise and timesteps (seed + 7919), no drops, eval mode:
    comparable across steps and runs, and independent of the training randomness (resumes stay exact)."""

    def __init__(self, losses: Losses, batch: Any, seed: int):
        self.losses, self.batch, self.seed = losses, batch, seed + 7919

    @classmethod
    def first(cls, stage: Stage, count: int, seed: int, device: torch.device) -> FixedEvaluation:
        from accelerate.utils import send_to_device
        from torch.utils.data import default_collate

        samples = [stage.eval_samples[i] for i in range(min(count, len(stage.eval_samples)))]
        batch = (stage.collate_fn or default_collate)(samples)
        return cls(stage.losses, send_to_device(batch, device), seed)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        with eval_mode(model):  # BatchNorm on its running statistics
            values = self.losses(model, self.batch, torch.Generator().manual_seed(self.seed), False)
        return {f"eval_{name}": float(value) for name, value in values.items()}


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """The modules in eval mode for the block; afterwards every submodule gets its own mode back (frozen parts
    inside a trained model stay in eval mode)."""
    modes = {m: m.training for module in modules if module is not None for m in module.modules()}
    for module in modes:
        module.training = False
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def run_stage(accelerator: Any, config: TrainConfig, stage: Stage) -> Path:
    """Train `stage` (or resume it) to config.max_steps; returns RUN/weights.safetensors.

    The order of diffusers' training examples: optimizer, data, prepare, save/load hooks, resume, loop (log,
    evaluate, sample images, checkpoint), final evaluation and weights.
    """
    parameters = trainable_parameters(stage.model)
    optimizer, scheduler = make_optimizer(config, parameters, accelerator.num_processes)
    loader = make_loader(stage.samples, config, accelerator.num_processes, stage.collate_fn)
    model, optimizer, loader, scheduler = accelerator.prepare(stage.model, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    state = RunState(accelerator, config.seed)

    def save_own_state(models: list, weights: list, output_dir: str) -> None:
        weights.clear()  # the project's weights file replaces accelerate's model file
        if accelerator.is_main_process:
            stage.save(accelerator.unwrap_model(models[0]), Path(output_dir) / WEIGHTS)
        state.save(Path(output_dir))

    def load_own_state(models: list, input_dir: str) -> None:
        stage.load(accelerator.unwrap_model(models.pop()), Path(input_dir) / WEIGHTS)
        state.load(Path(input_dir))

    accelerator.register_save_state_pre_hook(save_own_state)
    accelerator.register_load_state_pre_hook(load_own_state)
    resume = resume_dir(config)
    if resume is not None:
        check_checkpoint(resume)
        accelerator.load_state(str(resume))
        accelerator.print(f"resumed from {resume} at step {state.step}")

    metrics = Metrics(accelerator, config, stage.name)
    evaluation = FixedEvaluation.first(stage, config.eval_samples, config.seed, accelerator.device)

    def evaluate(step: int) -> dict[str, float]:
        return evaluation(unwrapped) | (stage.bench(step, unwrapped) if stage.bench else {})

    if state.step == 0:
        metrics.log(evaluate(0), 0)
    progress = Progress(accelerator, config, stage.name, state.step)
    sampling = stage.sample_images is not None and config.validation_steps > 0 and accelerator.is_main_process
    for batch in epochs(accelerator, loader, state):
        if state.step >= config.max_steps:
            break
        with accelerator.accumulate(model):
            losses = stage.losses(model, batch, state.generator, True)
            accelerator.backward(losses["loss"])
            clip_and_step(accelerator, config, parameters, optimizer, scheduler)
        metrics.record(state.step + 1, stage.batch_rows(batch))
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        values = {name: mean_over_processes(accelerator, value) for name, value in losses.items()}
        values["lr"] = scheduler.get_last_lr()[0]
        metrics.log(values, state.step)
        progress.update(values)
        if config.eval_steps and state.step % config.eval_steps == 0:
            metrics.log(evaluate(state.step), state.step)
        if sampling and state.step % config.validation_steps == 0:
            save_samples(accelerator, stage.sample_images(unwrapped), config.output_dir, state.step)
        if state.step % config.checkpointing_steps == 0:
            progress.note(f"step {state.step}: checkpoint {save_checkpoint(accelerator, config, state.step)}")

    if not config.eval_steps or state.step % config.eval_steps:
        metrics.log(evaluate(state.step), state.step)
    progress.close()
    accelerator.wait_for_everyone()
    out = Path(config.output_dir) / WEIGHTS
    if accelerator.is_main_process:
        stage.save(unwrapped, out)
    accelerator.end_training()
    return out


def save_samples(accelerator: Any, images: list[Any], output_dir: str | Path, step: int) -> Path:
    """PNG files under samples/step-<N>/ and, with TensorBoard, an image grid in the logs."""
    folder = Path(output_dir) / "samples" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("samples", stacked, step, dataformats="NHWC")
    return folder
