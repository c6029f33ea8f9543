"""The shared train loop with a tiny stand-in model: pure helpers, then one real 2-worker Ray Train
fit in which a worker is killed mid-run and the run resumes from its last checkpoint."""

import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from cxrcf.config import OptimConfig, RayConfig
from training.loop import (
    Batcher,
    LoopConfig,
    Task,
    fit,
    format_progress,
    optimizer_from_files,
    optimizer_to_files,
    shard_batch_size,
    warmup_lr,
)

RES = 8


def standin_data(split: str, n: int = 96):
    """Images whose mean brightness encodes sex, so the stand-in can learn something."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    sex = (torch.rand(n, generator=g) < 0.5).float()
    x = torch.rand(n, 1, RES, RES, generator=g) * 0.5 - 0.25 + (sex * 0.5 - 0.25).view(n, 1, 1, 1)
    parents = {"sex": sex, "race": torch.zeros(n, dtype=torch.long), "age": torch.full((n,), 50.0),
               "finding": torch.zeros(n)}
    return x, parents


class StandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(RES * RES, 1))

    def forward(self, x, parents, rng):
        loss = nn.functional.binary_cross_entropy_with_logits(self.model(x).squeeze(1), parents["sex"])
        return {"loss": loss}


def standin_validate(model, x, parents, device):
    logits = model(x.to(device)).squeeze(1).cpu()
    return {"loss": float(nn.functional.binary_cross_entropy_with_logits(logits, parents["sex"])),
            "acc": float(((logits > 0).float() == parents["sex"]).float().mean())}


def test_shards_and_batches():
    for batch, world in [(32, 2), (33, 2), (10, 3), (1, 1)]:
        assert sum(shard_batch_size(batch, r, world) for r in range(world)) == batch
    a, b = Batcher(10, 4, seed=3), Batcher(10, 4, seed=3)
    seen = [a.next() for _ in range(5)]
    b.skip(3)
    assert torch.equal(b.next(), seen[3]) and torch.equal(b.next(), seen[4])
    # The first epoch visits every index once before any repeats.
    assert sorted(torch.cat(seen[:2] + [seen[2][:2]]).tolist()) == list(range(10))


def test_warmup_and_progress_line():
    optim = OptimConfig(steps=10, batch_size=4, lr=1e-3, warmup_steps=4)
    assert [round(warmup_lr(optim, s), 6) for s in (0, 1, 3, 8)] == [0.00025, 0.0005, 0.001, 0.001]
    line = format_progress("generator", 5, 10, {"loss": 1.23456}, 512.0, 75.0)
    assert line == "[generator] step 5/10 loss=1.235 | 512 img/s | ETA 1m15s"


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    groups = optimizer_to_files(opt, tmp_path)
    json.dumps(groups)  # the state.json part must be plain JSON
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    optimizer_from_files(opt2, tmp_path, json.loads(json.dumps(groups)))
    for k, v in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(opt2.state_dict()["state"][0][k], v)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert not list(tmp_path.glob("*.pkl")) and (tmp_path / "optimizer.safetensors").is_file()


@dataclass(frozen=True)
class KillOnce:
    """A step hook that kills the last rank once at `step` of the first task (a worker fault)."""

    step: int
    marker: str  # exists once the fault has happened

    def __call__(self, task: int, step: int, rank: int, world: int) -> None:
        marker = Path(self.marker)
        if task != 0 or step != self.step or rank != world - 1 or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed at step {step}\n")
        print(f"fault injection: rank {rank} exits at step {step}", flush=True)
        # The controller registers reported checkpoints when it polls the workers; waiting a few
        # polls makes "resume from the last checkpoint" independent of timing.
        time.sleep(1.0 + 3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
        os._exit(1)


def test_killed_worker_resumes_from_checkpoint(ray_cluster, tmp_path):
    # Ray workers cannot import this test module, so its stand-ins travel by value.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    optim_a = OptimConfig(steps=12, batch_size=16, lr=5e-2, warmup_steps=2, val_every=6, checkpoint_every=4,
                          ema_rate=0.5)
    optim_b = OptimConfig(steps=5, batch_size=8, lr=1e-2, warmup_steps=0, val_every=5, checkpoint_every=5, seed=4)
    tasks = [Task("a", optim_a, StandIn, standin_data, validate=standin_validate, select="loss"),
             Task("b", optim_b, StandIn, functools.partial(standin_data, n=40), validate=standin_validate)]
    marker = tmp_path / "fault.marker"
    cfg = LoopConfig(tasks=tasks, step_hooks=(KillOnce(6, str(marker)),), metric_prefix=True)
    result = fit(cfg, RayConfig(num_workers=2, storage_path=str(tmp_path / "ray"), max_failures=1), "loop-test")
    assert marker.read_text().startswith("killed at step 6")  # the fault really happened
    a, b = result.metrics["a"], result.metrics["b"]
    assert a["resumed_step"] == 4 and a["steps"] == 12  # resumed from the step-4 checkpoint and finished
    assert b["resumed_step"] == 0 and b["steps"] == 5
    assert a["val_acc"] > 0.8 and "best_loss" in a  # the stand-in learnt the brightness rule
    assert set(result.weights) == {"a", "b"}
    model = StandIn().model
    model.load_state_dict(result.weights["a"])  # exported weights fit the model
    checkpoints = [c for c in (tmp_path / "ray" / result.run_name).glob("checkpoint_*") if c.is_dir()]
    assert checkpoints and all((c / "state.json").is_file() for c in checkpoints)
    assert not list((tmp_path / "ray").rglob("*.pkl"))


def test_gradient_skipping_and_ema_warmup():
    from training.loop import EMA, optimizer_step

    model = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    optim = OptimConfig(steps=1, batch_size=1, lr=1.0, grad_clip=1.0, grad_skip=10.0)
    before = model.weight.detach().clone()
    norm, applied = optimizer_step(model.weight.sum() * 50, opt, list(model.parameters()), optim)
    assert not applied and norm > 10 and torch.equal(model.weight, before)  # skipped, weights untouched
    norm, applied = optimizer_step(model.weight.sum() * 3, opt, list(model.parameters()), optim)
    assert applied and float(norm) == pytest.approx(3 * 2 ** 0.5)
    # clipped to norm 1: each of the two equal components moves by 1/sqrt(2)
    torch.testing.assert_close(model.weight, before - 2 ** -0.5)
    ema = EMA(model, rate=0.999)
    assert ema.decay() == pytest.approx(0.1)  # warm-up: (1+0)/(10+0)
    ema.updates = 100_000
    assert ema.decay() == 0.999
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.model.weight.data.fill_(0.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 0.001))


def test_impossible_resource_request_is_a_clear_error(ray_cluster, tmp_path):
    from cxrcf.errors import CxrcfError

    task = Task("a", OptimConfig(steps=1, batch_size=4, lr=1e-2), StandIn, standin_data)
    with pytest.raises(CxrcfError, match="ray.num_workers"):
        fit(LoopConfig(tasks=[task]), RayConfig(num_workers=64, storage_path=str(tmp_path)), "too-big")
    with pytest.raises(CxrcfError, match="ray.use_gpu"):
        fit(LoopConfig(tasks=[task]), RayConfig(num_workers=int(ray_cluster.cluster_resources().get("GPU", 0)) + 1,
                                                cpus_per_worker=0.01, use_gpu=True, storage_path=str(tmp_path)),
            "no-gpu")


def test_ray_train_report_and_checkpoint_chatter_is_silenced():
    # The loggers Ray writes "Reporting training result ..." and "Checkpoint successfully created ..." to;
    # if Ray moves them, this fails instead of the console quietly flooding again.
    import logging

    from ray.train.v2._internal.execution import context, storage
    from ray.train.v2.torch import train_loop_utils

    from training.loop import quiet_ray_train_logs

    quiet_ray_train_logs()
    for logger in (context.logger, storage.logger, train_loop_utils.logger):
        assert not logger.isEnabledFor(logging.INFO), logger.name
        assert logger.isEnabledFor(logging.WARNING), logger.name
