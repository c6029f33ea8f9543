"""The one train loop every phase runs inside a Ray Train `TorchTrainer`.

A phase supplies `Task`s. Each task's `build()` returns an *objective*: an `nn.Module` whose
`.model` is the network that is trained, EMA-averaged and exported, and whose
`forward(x, parents, rng)` returns a dict of scalar tensors including `loss`. Wrapping the whole
objective in DDP (not just `.model`) lets phases such as CFT call any method of the model
(abduct, decode) while DDP still synchronises the gradients. Optional objective hooks:
`before_step(step)` (step-dependent schedules), `after_step(metrics)` (sees metrics averaged over
workers, e.g. the Lagrange multiplier update; called only when the update was applied),
`extra_state()` / `load_extra_state(d)` (JSON scalars that must survive a restart).

Several tasks can share one fit (the predictors phase trains two networks) so the workers start once.

Checkpoint directory (written by rank 0, reported by every rank):
  state.json            task index, step, skipped updates, best validation value, extra state,
                        optimizer param_groups, finished tasks' metrics
  model.safetensors     current weights of `.model`
  ema.safetensors       EMA weights
  best.safetensors      EMA weights at the best validation value (tasks with `select`)
  optimizer.safetensors AdamW moments and step counts, keys `<param index>.<name>`
  final/<task>.safetensors  exported weights of finished tasks
The last checkpoint of a fit holds only state.json and final/; its state.json names a numerical fault
(`fault`: task, step, cause) when one ended the fit (see FaultGuard), and the driver then exports nothing.
No pickle is written. The fp16 GradScaler (GPUs without bf16 only) restarts from its default scale.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcf.config import OptimConfig, RayConfig


@dataclass
class Task:
    name: str
    optim: OptimConfig
    build: Callable[[], Any]  # -> objective nn.Module with `.model`
    data: Callable[[str], tuple[Any, dict]]  # split -> (x (N,1,R,R), parents dict)
    validate: Callable[[Any, Any, dict, Any], dict[str, float]] | None = None  # (ema model, x, parents, device)
    select: str | None = None  # validation metric (lower is better) that picks the exported EMA weights
    find_unused_parameters: bool = False


@dataclass
class LoopConfig:
    tasks: list[Task]
    run_id: str | None = None
    tracking_uri: str | None = None
    progress_every: int = 0  # 0: about 20 lines per task
    # called as hook(task=index, step=step, rank=rank, world=world) before every training step on every
    # worker (picklable; the tests inject a worker fault through one)
    step_hooks: tuple[Callable[..., None], ...] = ()
    metric_prefix: bool = False  # prefix metric names with the task name (several tasks per fit)


@dataclass
class StepRng:
    """Per-step randomness: `shared` is identical on every rank (e.g. CFT's choice of parent),
    `local` differs by rank; both are derived from (seed, step) so a resumed run replays them."""

    shared: Any
    local: Any
    device: Any


@dataclass
class FitResult:
    weights: dict[str, dict]  # task name -> exported state dict (CPU tensors)
    metrics: dict[str, dict[str, float]]
    run_name: str
    storage_path: str


# ----------------------------------------------------------------------------------- small pieces
def warmup_lr(optim: OptimConfig, step: int) -> float:
    if optim.warmup_steps <= 0:
        return optim.lr
    return optim.lr * min(1.0, (step + 1) / optim.warmup_steps)


def shard_batch_size(batch_size: int, rank: int, world: int) -> int:
    """This rank's share of the global batch; the shares sum to `batch_size`."""
    return batch_size // world + (1 if rank < batch_size % world else 0)


class Batcher:
    """Epoch-wise permutations of this rank's shard; `skip(n)` replays n batches so a resumed run
    continues the exact sample order."""

    def __init__(self, n: int, batch: int, seed: int):
        import torch

        if n < 1:
            raise ValueError("empty data shard")
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self):
        import torch

        parts, need = [], self.batch
        while need > 0:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
            take = self.perm[self.pos:self.pos + need]
            self.pos += len(take)
            need -= len(take)
            parts.append(take)
        return torch.cat(parts)

    def skip(self, batches: int) -> None:
        for _ in range(batches):
            self.next()


def step_rng(seed: int, step: int, rank: int, device):
    import torch

    base = seed * 1_000_003 + step
    shared = torch.Generator().manual_seed(base)
    local = torch.Generator().manual_seed(base * 31 + 7_919 * (rank + 1))
    dev = torch.Generator(device=device).manual_seed(base * 37 + 104_729 * (rank + 1))
    return StepRng(shared, local, dev)


class EMA:
    """EMA of the weights with the usual warm-up: the decay after n updates is
    min(rate, (1 + n) / (10 + n)), so short runs export trained weights rather than a copy of the
    initialisation (with 0.999 from step 0, a 30-step run would keep ~97% of the random init)."""

    def __init__(self, model, rate: float, updates: int = 0):
        self.rate = rate
        self.updates = updates
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self) -> float:
        return min(self.rate, (1 + self.updates) / (10 + self.updates))

    def update(self, model) -> None:
        import torch

        with torch.no_grad():
            src = list(model.parameters())
            dst = list(self.model.parameters())
            torch._foreach_lerp_(dst, src, 1.0 - self.decay())
            self.updates += 1
            for b_dst, b_src in zip(self.model.buffers(), model.buffers()):
                b_dst.copy_(b_src)


def optimizer_step(loss, opt, params, optim: OptimConfig, scaler=None):
    """Backward, clip to grad_clip, and step unless the norm exceeds grad_skip (or is not finite).
    Returns (grad norm before clipping, whether the update was applied)."""
    import torch

    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
    # Under DDP the gradients are already all-reduced, so every rank takes the same decision.
    applied = bool(torch.isfinite(grad_norm)) and grad_norm.item() <= optim.grad_skip
    if scaler is not None:
        if applied:
            scaler.step(opt)
        scaler.update()
    elif applied:
        opt.step()
    return grad_norm, applied


def cpu_state(module_or_state) -> dict:
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_tensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(cpu_state(state), str(path))


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def make_optimizer(objective, params: list, optim):
    """AdamW over `params`, or over the objective's `param_groups()`, where a group's `lr_mult` scales
    the rate it gets (kept in the group, so it survives a checkpoint)."""
    import torch

    groups = objective.param_groups() if hasattr(objective, "param_groups") else [{"params": params}]
    return torch.optim.AdamW([{**g, "lr": optim.lr * g.get("lr_mult", 1.0)} for g in groups], lr=optim.lr,
                             betas=optim.betas, weight_decay=optim.weight_decay)


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def optimizer_to_files(opt, directory: Path) -> dict:
    """Tensors to optimizer.safetensors; returns the JSON-able param_groups."""
    sd = opt.state_dict()
    flat = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if hasattr(v, "shape")}
    save_tensors(flat, directory / "optimizer.safetensors")
    return sd["param_groups"]


def optimizer_from_files(opt, directory: Path, param_groups: list) -> None:
    state: dict[int, dict] = {}
    for key, value in load_tensors(directory / "optimizer.safetensors").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def format_progress(name: str, step: int, total: int, metrics: dict[str, float], images_per_s: float,
                    eta_s: float) -> str:
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    eta = f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s" if math.isfinite(eta_s) else "?"
    return f"[{name}] step {step}/{total} {shown} | {images_per_s:.0f} img/s | ETA {eta}"


def say(line: str) -> None:
    """One console line. Not `print`: Ray Train patches print into its logger, which echoes it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# A single non-finite loss is skipped like any bad update; this many in a row, with the weights unchanged
# in between, means the run has diverged and will not recover by itself.
NONFINITE_STREAK = 20


class NumericalFault(Exception):
    """A task can no longer produce usable weights; the fit ends and the driver exports nothing."""

    def __init__(self, task: str, step: int, cause: str):
        super().__init__(f"{task} step {step}: {cause}")
        self.task, self.step, self.cause = task, step, cause


@dataclass
class FaultGuard:
    """Numerical faults of one task. Every rank checks the same values (losses averaged over workers, the
    all-reduced update decision, rank 0's validation broadcast), so all ranks stop at the same step."""

    task: str
    streak: int = 0

    def after_step(self, step: int, loss: float) -> None:
        self.streak = 0 if math.isfinite(loss) else self.streak + 1
        if self.streak >= NONFINITE_STREAK:
            raise NumericalFault(self.task, step, f"loss non-finite ({loss}) on {self.streak} consecutive steps; "
                                                  "training diverged")

    def after_validation(self, step: int, metric: str, value: float) -> None:
        # `value < nan` is false: a NaN best would silently freeze the export at this checkpoint
        if not math.isfinite(value):
            raise NumericalFault(self.task, step, f"validation {metric} is {value}, so no checkpoint can be "
                                                  "chosen by it")

    def at_end(self, step: int, skipped: int, weights: dict) -> None:
        import torch

        if skipped >= step:
            raise NumericalFault(self.task, step, f"all {step} updates were skipped (gradient norm non-finite or "
                                                  "above optim.grad_skip)")
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NumericalFault(self.task, step, f"exported weights not finite ({', '.join(bad[:3])})")


# ------------------------------------------------------------------------------------- the worker
class _Tracker:
    """Rank 0's buffered MLflow metric writer."""

    def __init__(self, cfg: LoopConfig, rank: int):
        self.on = bool(cfg.run_id) and rank == 0
        self.cfg = cfg
        self.rows: list[tuple[str, float, int]] = []

    def add(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        if self.on:
            self.rows += [(f"{prefix}{k}", v, step) for k, v in metrics.items() if math.isfinite(v)]

    def flush(self) -> None:
        if self.on and self.rows:
            from store.tracking import log_metrics

            log_metrics(self.cfg.run_id, self.rows, self.cfg.tracking_uri)
            self.rows = []


def _from_rank0(value: float, world: int) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if world > 1:
        dist.broadcast(t, src=0)
    return float(t[0])


def _average(values: list[float], world: int):
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


# Ray Train's worker logs each report, each persisted checkpoint and the device move at INFO: three long
# lines per checkpoint that buried the progress lines of `make run`. Its warnings and errors still show.
_RAY_TRAIN_CHATTY = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage",
                     "ray.train.v2.torch.train_loop_utils")


def quiet_ray_train_logs() -> None:
    for module in _RAY_TRAIN_CHATTY:
        spec = importlib.util.find_spec(module)
        # `context` names its logger by file path, the others by module name
        for name in (module, spec.origin if spec else None):
            if name:
                logging.getLogger(name).setLevel(logging.WARNING)


def worker_main(config: dict) -> None:
    """`train_loop_per_worker`: runs every task of the LoopConfig, resuming from the last checkpoint."""
    import ray.train
    import ray.train.torch

    quiet_ray_train_logs()
    cfg: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tracker = _Tracker(cfg, rank)
    if tracker.on:
        # MLflow takes seconds to import; let that overlap with loading data and building the model.
        threading.Thread(target=__import__, args=("mlflow.tracking",), daemon=True).start()

    resume: dict | None = None
    finished_weights: dict[str, dict] = {}
    finished_metrics: dict[str, dict] = {}
    ckpt = ray.train.get_checkpoint()
    ckpt_dir = None
    if ckpt is not None:
        ckpt_dir = Path(tempfile.mkdtemp(prefix="cxrcf-resume-"))
        with ckpt.as_directory() as d:
            shutil.copytree(d, ckpt_dir, dirs_exist_ok=True)
        resume = json.loads((ckpt_dir / "state.json").read_text())
        finished_metrics = resume.get("finished", {})
        for name in finished_metrics:
            finished_weights[name] = load_tensors(ckpt_dir / "final" / f"{name}.safetensors")
        if rank == 0:
            say(f"resuming from checkpoint: task {resume['task']} step {resume['step']}")

    data_cache: dict[tuple[int, str], tuple] = {}

    def data(task: Task, split: str):
        key = (id(task.data), split)
        if key not in data_cache:
            data_cache[key] = task.data(split)
        return data_cache[key]

    # a resumed run that had failed numerically fails again: its checkpoint is the fault, not weights
    fault = resume.get("fault") if resume else None
    start_task = resume["task"] if resume else 0
    try:
        for index, task in enumerate(cfg.tasks):
            if index < start_task or task.name in finished_metrics:
                continue
            task_resume = resume if (resume and resume["task"] == index) else None
            weights, metrics = _run_task(cfg, index, task, _Worker(rank, world, device, tracker, data), task_resume,
                                         ckpt_dir if task_resume else None, finished_weights, finished_metrics)
            finished_weights[task.name] = weights
            finished_metrics[task.name] = metrics
    except NumericalFault as err:
        fault = {"task": err.task, "step": err.step, "cause": err.cause}
        if rank == 0:
            say(f"[{err.task}] numerical fault: {err}")

    # The final report carries every task's exported weights (or the fault); it is the result the driver reads.
    directory = Path(tempfile.mkdtemp(prefix="cxrcf-final-"))
    if rank == 0:
        _write_finals(directory, finished_weights)
        state = {"task": len(cfg.tasks), "step": 0, "finished": finished_metrics}
        if fault:
            state["fault"] = fault
        (directory / "state.json").write_text(json.dumps(state))
    flat = {f"{t}/{k}": v for t, m in finished_metrics.items() for k, v in m.items()}
    ray.train.report({"done": 1, **flat},
                     checkpoint=ray.train.Checkpoint.from_directory(str(directory)) if rank == 0 else None)
    shutil.rmtree(directory, ignore_errors=True)
    tracker.flush()
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _write_finals(directory: Path, finished_weights: dict[str, dict]) -> None:
    (directory / "final").mkdir(parents=True, exist_ok=True)
    for name, state in finished_weights.items():
        save_tensors(state, directory / "final" / f"{name}.safetensors")


@dataclass
class _Worker:
    """Where a task runs: this worker's rank among `world`, its device, tracker and data cache."""

    rank: int
    world: int
    device: Any
    tracker: _Tracker
    data: Callable[[Task, str], tuple]


@dataclass
class _Progress:
    """What a checkpoint carries besides the weights: where training stands and its best so far."""

    start: int = 0
    skipped: int = 0
    best: float | None = None
    best_step: int | None = None
    best_state: dict | None = None
    val: dict = field(default_factory=dict)
    checkpoints: int = 0  # written by this attempt (not resumed), and the seconds they took with the upload
    checkpoint_s: float = 0.0

    @classmethod
    def resumed(cls, resume: dict | None, ckpt_dir: Path | None) -> _Progress:
        if not resume:
            return cls()
        best = resume.get("best")
        return cls(start=resume["step"], skipped=resume.get("skipped", 0), best=best,
                   best_step=resume.get("best_step"), val=dict(resume.get("val", {})),
                   best_state=load_tensors(ckpt_dir / "best.safetensors") if best is not None else None)


def _build(task: Task, device, resume: dict | None, ckpt_dir: Path | None):
    """(objective, its model, EMA, DDP-wrapped objective, trained parameters, optimizer), resumed if asked."""
    import ray.train.torch
    import torch

    optim = task.optim
    torch.manual_seed(optim.seed)
    objective = task.build()
    model = objective.model
    if resume:
        model.load_state_dict(load_tensors(ckpt_dir / "model.safetensors"))
        if hasattr(objective, "load_extra_state"):
            objective.load_extra_state(resume.get("extra", {}))
    objective.to(device)
    ema = EMA(model, optim.ema_rate, updates=resume.get("ema_updates", 0) if resume else 0)
    if resume:
        ema.model.load_state_dict(load_tensors(ckpt_dir / "ema.safetensors"))
    wrapped = ray.train.torch.prepare_model(
        objective, parallel_strategy_kwargs={"find_unused_parameters": task.find_unused_parameters})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(objective, params, optim)
    if resume:
        optimizer_from_files(opt, ckpt_dir, resume["optimizer"])
    return objective, model, ema, wrapped, params, opt


def _mixed_precision(device, optim: OptimConfig):
    """(autocast on?, its dtype, a grad scaler for float16 or None)."""
    import torch

    use_amp = device.type == "cuda" and optim.mixed_precision
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda") if (use_amp and amp_dtype == torch.float16) else None
    return use_amp, amp_dtype, scaler


def _task_metrics(task: Task, last: dict, progress: _Progress, train_time: float, timed_images: int,
                  t_task: float) -> dict[str, float]:
    optim = task.optim
    metrics = {f"train_{k}": v for k, v in last.items()}
    metrics.update({f"val_{k}": v for k, v in progress.val.items()})
    if task.select is not None and progress.best is not None:
        metrics[f"best_{task.select}"] = progress.best
        metrics["best_step"] = float(progress.best_step)
    metrics.update({"steps": float(optim.steps), "skipped_updates": float(progress.skipped),
                    "resumed_step": float(progress.start),
                    "checkpoints": float(progress.checkpoints), "checkpoint_s": progress.checkpoint_s,
                    "images_per_s": timed_images / train_time if train_time > 0 else float("nan"),
                    "wall_s": time.perf_counter() - t_task})
    return metrics


def _run_task(cfg: LoopConfig, index: int, task: Task, w: _Worker, resume: dict | None, ckpt_dir: Path | None,
              finished_weights: dict, finished_metrics: dict):
    """Train one task on this worker (from `resume` if given); returns (exported weights, metrics)."""
    import ray.train
    import torch

    optim, rank, world, device, tracker = task.optim, w.rank, w.world, w.device, w.tracker
    prefix = f"{task.name}/" if cfg.metric_prefix else ""
    objective, model, ema, wrapped, params, opt = _build(task, device, resume, ckpt_dir)
    progress = _Progress.resumed(resume, ckpt_dir)
    guard = FaultGuard(task.name)

    x_train, p_train = w.data(task, "train")
    shard = torch.arange(rank, len(x_train), world)
    local_batch = shard_batch_size(optim.batch_size, rank, world)
    batcher = Batcher(len(shard), local_batch, optim.seed + rank)
    start = progress.start
    batcher.skip(start)
    use_amp, amp_dtype, scaler = _mixed_precision(device, optim)

    if rank == 0:
        say(f"[{task.name}] {world} worker(s) on {device.type}, {torch.get_num_threads()} thread(s) each, "
            f"batch {optim.batch_size} ({local_batch} per worker), steps {start}->{optim.steps}"
            + (f", {amp_dtype} autocast" if use_amp else ""))
    every = cfg.progress_every or max(1, optim.steps // 20)
    t_task = time.perf_counter()
    train_time, timed_images, window_t, window_steps = 0.0, 0, time.perf_counter(), 0
    last: dict[str, float] = {}

    def validate() -> None:
        """Rank 0 validates; every rank then checks the selection value it broadcasts."""
        value = 0.0
        if task.validate is not None and rank == 0:
            x_val, p_val = w.data(task, "val")
            ema.model.eval()
            with torch.no_grad():
                res = task.validate(ema.model, x_val, p_val, device)
            progress.val.update(res)
            tracker.add(prefix + "val_", res, step)
            say(f"[{task.name}] validation at step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in res.items()))
            if task.select is not None:
                value = res[task.select]
                if progress.best is None or value < progress.best:
                    progress.best, progress.best_state, progress.best_step = value, cpu_state(ema.model), step
        if task.validate is not None and task.select is not None:
            guard.after_validation(step, task.select, _from_rank0(value, world))

    def checkpoint(step_done: int) -> None:
        t_ckpt = time.perf_counter()
        directory = Path(tempfile.mkdtemp(prefix="cxrcf-ckpt-"))
        if rank == 0:
            save_tensors(cpu_state(model), directory / "model.safetensors")
            save_tensors(cpu_state(ema.model), directory / "ema.safetensors")
            if progress.best_state is not None:
                save_tensors(progress.best_state, directory / "best.safetensors")
            groups = optimizer_to_files(opt, directory)
            _write_finals(directory, finished_weights)
            state = {"task": index, "step": step_done, "skipped": progress.skipped, "best": progress.best,
                     "best_step": progress.best_step, "val": progress.val,
                     "ema_updates": ema.updates,
                     "optimizer": groups, "finished": finished_metrics,
                     "extra": objective.extra_state() if hasattr(objective, "extra_state") else {}}
            (directory / "state.json").write_text(json.dumps(state))
        tracker.flush()
        ray.train.report({"task": index, "step": step_done, **{f"{prefix}{k}": v for k, v in last.items()}},
                         checkpoint=ray.train.Checkpoint.from_directory(str(directory)) if rank == 0 else None)
        shutil.rmtree(directory, ignore_errors=True)
        # report() returns once the checkpoint is in storage (local folder or S3): the time includes the upload
        progress.checkpoints += 1
        progress.checkpoint_s += time.perf_counter() - t_ckpt

    def train_step() -> dict[str, float]:
        """One optimiser step on this worker's next batch; the metrics averaged over workers."""
        idx = shard[batcher.next()]
        x = x_train[idx].to(device, non_blocking=True)
        parents = {k: v[idx].to(device, non_blocking=True) for k, v in p_train.items()}
        set_lr(opt, warmup_lr(optim, step))
        rng = step_rng(optim.seed, step, rank, device)
        if hasattr(objective, "before_step"):
            objective.before_step(step)  # schedules (e.g. the KL weight) follow the step, also on resume
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            out = wrapped(x, parents, rng)
        grad_norm, applied = optimizer_step(out["loss"], opt, params, optim, scaler)
        if applied:
            ema.update(model)
        else:
            progress.skipped += 1
        keys = list(out)
        averaged = dict(zip(keys, _average([float(out[k].detach()) for k in keys], world), strict=True))
        # A skipped update leaves the objective's own state alone too (the reference steps its
        # Lagrange multiplier only with an applied generator update).
        if applied and hasattr(objective, "after_step"):
            objective.after_step(averaged)
        if hasattr(objective, "extra_state"):
            averaged.update(objective.extra_state())
        averaged["grad_norm"] = float(grad_norm)
        return averaged

    wrapped.train()
    step = start
    while step < optim.steps:
        for hook in cfg.step_hooks:
            hook(task=index, step=step, rank=rank, world=world)
        t0 = time.perf_counter()
        last = train_step()
        step += 1
        guard.after_step(step, last["loss"])
        dt = time.perf_counter() - t0
        # The first steps pay for lazy initialisation; leave them out of the throughput figure.
        if step - start > 3:
            train_time += dt
            timed_images += optim.batch_size
        window_steps += 1
        tracker.add(prefix, {**last, "lr": opt.param_groups[0]["lr"], "skipped": progress.skipped}, step)
        if rank == 0 and (step % every == 0 or step == optim.steps):
            now = time.perf_counter()
            ips = optim.batch_size * window_steps / max(now - window_t, 1e-9)
            eta = (optim.steps - step) * (now - window_t) / max(window_steps, 1)
            # the multiplier's Adam moments are optimiser state: in MLflow, not on the console
            shown = {k: v for k, v in last.items() if k != "grad_norm" and not k.startswith("lam_adam")}
            say(format_progress(task.name, step, optim.steps, shown, ips, eta))
            window_t, window_steps = now, 0
            tracker.flush()
        if step % optim.val_every == 0 or step == optim.steps:
            validate()
            wrapped.train()
        if step % optim.checkpoint_every == 0 and step < optim.steps:
            checkpoint(step)

    metrics = _task_metrics(task, last, progress, train_time, timed_images, t_task)
    exported = progress.best_state if (task.select is not None and progress.best_state is not None) else None
    weights = exported if exported is not None else cpu_state(ema.model)
    guard.at_end(step, progress.skipped, weights)
    tracker.add(prefix, {k: v for k, v in metrics.items() if k.startswith(("images_per_s", "skipped"))}, step)
    tracker.flush()
    return weights, metrics


# ------------------------------------------------------------------------------------- the driver
def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A cluster started here runs the dashboard on loopback: Ray Train's placement-group cleaner polls
        # the State API through it and otherwise logs a warning on every poll.
        local = {} if address else {"include_dashboard": True, "dashboard_host": "127.0.0.1"}
        ray.init(address=address, **local)


def _check_resources(ray_cfg: RayConfig) -> None:
    """A request the cluster can never satisfy would leave Ray Train waiting forever; say so instead.
    Skipped on an external cluster (RAY_ADDRESS), whose autoscaler may add nodes."""
    import ray

    from cxrcf.errors import CxrcfError

    if os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    need_cpu = ray_cfg.num_workers * ray_cfg.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise CxrcfError(f"ray.num_workers x ray.cpus_per_worker = {need_cpu:g} CPUs but the local Ray cluster "
                         f"has {have.get('CPU', 0):g}")
    if ray_cfg.use_gpu and ray_cfg.num_workers > have.get("GPU", 0):
        raise CxrcfError(f"ray.use_gpu: {ray_cfg.num_workers} GPU worker(s) requested but the local Ray cluster "
                         f"has {have.get('GPU', 0):g} GPUs")


# S3 bucket names: 3-63 characters, lowercase letters, digits, dots and hyphens, a letter or digit at each end
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Storage:
    """Where Ray Train keeps a fit's checkpoints. `path` is what RunConfig's storage_path gets: an
    absolute local (or NFS) folder, or `bucket/prefix` with `filesystem` an S3 filesystem (Ray's documented
    way for an S3-compatible endpoint: the scheme is stripped when storage_filesystem is given)."""

    uri: str  # as a person reads it: /abs/folder or s3://bucket/prefix
    path: str
    filesystem: Any = None

    @property
    def remote(self) -> bool:
        return self.filesystem is not None


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the standard AWS variables (the S3-specific one first)."""
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(key, "").strip()
        if value:
            if not value.startswith(("http://", "https://")):
                from cxrcf.errors import CxrcfError

                raise CxrcfError(f"{key}={value!r}: an S3 endpoint URL starts with http:// or https://")
            return value
    return None


def resolve_storage(ray_cfg: RayConfig, check: bool = True) -> Storage:
    """`ray.storage_path` as Ray Train takes it: a local folder made absolute (and created), or
    `s3://bucket/prefix` on AWS S3 or on the endpoint of AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (credentials
    and region from the usual AWS variables, read on every node, so no secret travels in the run's config).
    `check`: make sure the bucket answers now, rather than in a worker's traceback mid-run."""
    from cxrcf.errors import CxrcfError

    raw = ray_cfg.storage_path.strip()
    if not raw:
        raise CxrcfError("ray.storage_path: empty; give a local/NFS folder or s3://bucket/prefix")
    scheme, sep, rest = raw.partition("://")
    if not sep:
        folder = Path(raw).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return Storage(uri=str(folder), path=str(folder))
    if scheme.lower() != "s3":
        raise CxrcfError(f"ray.storage_path: {raw!r}: {scheme}:// is not supported; use s3://bucket/prefix "
                         "(AWS S3 or an S3-compatible store) or a folder every node mounts (NFS)")
    bucket, _, prefix = rest.strip("/").partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise CxrcfError(f"ray.storage_path: {raw!r}: {bucket!r} is not an S3 bucket name "
                         "(3-63 lowercase letters, digits, dots or hyphens)")
    from pyarrow import fs

    endpoint = s3_endpoint()
    options: dict[str, Any] = {"connect_timeout": 10, "request_timeout": 60}
    if endpoint:
        options["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    filesystem = fs.S3FileSystem(**options)
    path = f"{bucket}/{prefix.strip('/')}".rstrip("/")
    where = f"s3://{path}" + (f" at {endpoint}" if endpoint else "")
    if check:
        try:
            info = filesystem.get_file_info(bucket)
        except OSError as err:
            raise CxrcfError(f"ray.storage_path: {where}: not reachable ({str(err).splitlines()[0]})") from None
        if info.type == fs.FileType.NotFound:
            raise CxrcfError(f"ray.storage_path: {where}: bucket {bucket!r} does not exist; create it first")
    return Storage(uri=f"s3://{path}", path=path, filesystem=filesystem)


def unique_name(phase: str) -> str:
    import uuid

    return f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def fit(cfg: LoopConfig, ray_cfg: RayConfig, phase: str, run_name: str | None = None) -> FitResult:
    """One TorchTrainer.fit() for all of `cfg.tasks`; returns the exported weights and metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cxrcf.errors import CxrcfError

    ensure_ray()
    _check_resources(ray_cfg)
    storage = resolve_storage(ray_cfg)
    name = run_name or unique_name(phase)
    trainer = TorchTrainer(
        train_loop_per_worker=worker_main,
        train_loop_config={"loop": cfg},
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker={"CPU": ray_cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage.path, storage_filesystem=storage.filesystem,
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        result = trainer.fit()
    except Exception as err:
        raise CxrcfError(f"train {phase}: Ray Train run {name} failed: {err}") from err
    finally:
        # Ray Train leaves its Ctrl-C handler behind, which would swallow a Ctrl-C during the export
        if main_thread and sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    if result.checkpoint is None:
        raise CxrcfError(f"train {phase}: Ray Train run {name} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        fault = state.get("fault")
        if fault:
            where = f"step {fault['step']}" if fault["task"] == phase else f"{fault['task']} step {fault['step']}"
            raise CxrcfError(f"train {phase}: {where}: {fault['cause']}; nothing exported")
        weights = {t: load_tensors(Path(d) / "final" / f"{t}.safetensors") for t in state["finished"]}
    return FitResult(weights=weights, metrics=state["finished"], run_name=name, storage_path=storage.uri)
