"""Numerical faults are loud: a loss that stays non-finite, a non-finite validation score and a task whose
every update was skipped end the phase with one line naming phase, step and cause, and nothing is
exported. The rules are checked directly; the way a fault leaves the workers (every rank stops at the
same step, the driver raises before exporting) is the same for all of them, and is checked once, on
the generator phase with 2 workers, with NaN injected through `LoopConfig.step_hooks`."""

import math
import sys
from dataclasses import dataclass

import pytest
import torch

from cxrcf.config import preset_params
from cxrcf.errors import CxrcfError
from training.loop import NONFINITE_STREAK, FaultGuard, NumericalFault


@dataclass(frozen=True)
class PoisonValidation:
    """A step hook that, at step `start`, makes every floating output of a module in eval mode NaN in this
    worker: the EMA weights validate to NaN while training goes on. A process-wide forward hook does it,
    so the real model runs unchanged."""

    start: int = 0

    def __call__(self, task: int, step: int, rank: int, world: int) -> None:
        if step != self.start:
            return

        def nan_out(module, args, output):
            if not module.training and isinstance(output, torch.Tensor) and output.is_floating_point():
                return output * math.nan
            return None

        torch.nn.modules.module.register_module_forward_hook(nan_out)


def test_fault_rules():
    guard = FaultGuard("generator")
    for step in range(1, NONFINITE_STREAK):
        guard.after_step(step, math.nan)
    guard.after_step(NONFINITE_STREAK, 1.0)  # one finite loss: a bad patch, not divergence
    for step in range(NONFINITE_STREAK + 1, 2 * NONFINITE_STREAK):
        guard.after_step(step, math.inf)
    with pytest.raises(NumericalFault, match=rf"generator step {2 * NONFINITE_STREAK}: loss non-finite \(inf\) on "
                                             rf"{NONFINITE_STREAK} consecutive steps"):
        guard.after_step(2 * NONFINITE_STREAK, math.inf)
    guard.after_validation(15, "loss", 3.5)
    with pytest.raises(NumericalFault, match="generator step 15: validation loss is nan"):
        guard.after_validation(15, "loss", math.nan)
    weights = {"w": torch.ones(2), "n": torch.tensor(3)}
    guard.at_end(30, 29, weights)  # one update applied
    with pytest.raises(NumericalFault, match="step 30: all 30 updates were skipped"):
        guard.at_end(30, 30, weights)
    with pytest.raises(NumericalFault, match=r"exported weights not finite \(w\)"):
        guard.at_end(30, 0, {"w": torch.tensor([1.0, math.nan]), "n": torch.tensor(3)})


def test_nan_first_validation_fails_the_generator_and_exports_nothing(ray_cluster, mlflow_uri, tiny_data, tmp_path):
    import ray.cloudpickle
    from mlflow.tracking import MlflowClient

    from training.generator import train_generator

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    experiment = "test-training-faults"
    first_val = 2  # the first validation comes early: the fault is the same at any step, only cheaper
    params = preset_params("smoke", ray={"num_workers": 2, "storage_path": str(tmp_path / "ray")},
                           mlflow={"experiment": experiment}, generator={"optim": {"val_every": first_val}})
    out, metrics = tmp_path / "generator", tmp_path / "generator.json"
    with pytest.raises(CxrcfError) as err:
        train_generator(params, tiny_data, out, metrics_file=metrics, step_hooks=(PoisonValidation(),))
    assert str(err.value) == (f"train generator: step {first_val}: validation loss is nan, so no checkpoint can be "
                              "chosen by it; nothing exported")
    assert not out.exists() and not metrics.exists()  # no model, no run.json, no metrics for DVC
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
