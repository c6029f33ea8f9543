"""The hard/soft target table of SCIENCE.md section 5 and the Lagrange multiplier, against hand-computed tensors."""

import pytest
import torch

from cxrcf.errors import CxrcfError
from training.cft import LagrangeMultiplier, aux_loss, cft_targets, lagrangian

# Two images. Factual: (male, white, 40y, no finding) and (female, black, 70y, effusion).
PARENTS = {"sex": torch.tensor([0.0, 1.0]), "race": torch.tensor([0, 2]),
           "age": torch.tensor([40.0, 70.0]), "finding": torch.tensor([0.0, 1.0])}
GUIDANCE = {"sex": torch.tensor([0.2, 0.9]), "finding": torch.tensor([0.35, 0.6]),
            "race": torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]), "age": torch.tensor([45.0, 66.0])}
FACTUAL_RACE = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])


def star(**changes):
    return {**PARENTS, **{k: torch.tensor(v) for k, v in changes.items()}}


def check(targets, sex, race, finding, age):
    torch.testing.assert_close(targets["sex"], torch.tensor(sex))
    torch.testing.assert_close(targets["race"], torch.tensor(race))
    torch.testing.assert_close(targets["finding"], torch.tensor(finding))
    torch.testing.assert_close(targets["age"], torch.tensor(age))


def test_do_sex():
    s = star(sex=[1.0, 0.0])
    check(cft_targets("hard", "sex", PARENTS, s, None), [1.0, 0.0], FACTUAL_RACE.tolist(), [0.0, 1.0], [40.0, 70.0])
    check(cft_targets("soft", "sex", PARENTS, s, GUIDANCE), [1.0, 0.0],
          [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], [0.35, 0.6], [40.0, 70.0])


def test_do_race_gives_three_class_targets():
    s = star(race=[2, 1])
    new_race = [[0.0, 0, 1], [0, 1, 0]]
    check(cft_targets("hard", "race", PARENTS, s, None), [0.0, 1.0], new_race, [0.0, 1.0], [40.0, 70.0])
    soft = cft_targets("soft", "race", PARENTS, s, GUIDANCE)
    check(soft, [0.2, 0.9], new_race, [0.35, 0.6], [40.0, 70.0])
    assert soft["race"].shape == (2, 3)


def test_do_finding():
    s = star(finding=[1.0, 0.0])
    check(cft_targets("hard", "finding", PARENTS, s, None), [0.0, 1.0], FACTUAL_RACE.tolist(), [1.0, 0.0],
          [40.0, 70.0])
    check(cft_targets("soft", "finding", PARENTS, s, GUIDANCE), [0.2, 0.9], [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
          [1.0, 0.0], [40.0, 70.0])


def test_do_age_finding_follows_the_scm_in_both_modes():
    # The SCM recomputed finding for image 0 (older -> effusion); image 1 keeps its effusion.
    s = star(age=[85.0, 30.0], finding=[1.0, 1.0])
    check(cft_targets("hard", "age", PARENTS, s, None), [0.0, 1.0], FACTUAL_RACE.tolist(), [1.0, 1.0], [85.0, 30.0])
    check(cft_targets("soft", "age", PARENTS, s, GUIDANCE), [0.2, 0.9], [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
          [1.0, 1.0], [85.0, 30.0])


def test_soft_targets_carry_no_gradient_and_bad_input_is_named():
    probs = {k: v.clone().requires_grad_(True) for k, v in GUIDANCE.items() if k != "age"}
    out = cft_targets("soft", "sex", PARENTS, star(sex=[1.0, 0.0]), probs)
    assert not out["finding"].requires_grad and not out["race"].requires_grad
    with pytest.raises(CxrcfError, match="mode"):
        cft_targets("medium", "sex", PARENTS, PARENTS, None)
    with pytest.raises(CxrcfError, match="guidance_probs"):
        cft_targets("soft", "sex", PARENTS, PARENTS, None)


def test_aux_loss_accepts_soft_targets():
    targets = cft_targets("soft", "sex", PARENTS, star(sex=[1.0, 0.0]), GUIDANCE)
    outputs = {"sex": torch.tensor([0.0, 0.0]), "finding": torch.tensor([0.0, 0.0]),
               "race": torch.zeros(2, 3), "age_loc": torch.tensor([-0.2, 0.4])}
    total, parts = aux_loss(outputs, targets)
    ln2, ln3 = torch.log(torch.tensor(2.0)), torch.log(torch.tensor(3.0))
    torch.testing.assert_close(parts["sex"], ln2)  # logit 0 costs ln 2 whatever the target
    torch.testing.assert_close(parts["race"], ln3)
    torch.testing.assert_close(parts["age"], torch.tensor(0.0))  # 40y -> -0.2, 70y -> 0.4 in model space
    torch.testing.assert_close(total, 2 * ln2 + ln3)


def test_lambda_moves_by_about_lr_per_step_whatever_the_gap_like_the_references_adam():
    # Adam's first step is lr * sign(grad): with beta1 = beta2 = 0.9, m_hat = g and v_hat = g^2.
    for gap in (0.01, 5.0):
        lam = LagrangeMultiplier(lr=0.1, betas=(0.9, 0.9))
        assert lam.step(f=2.0 + gap, eps=2.0) == pytest.approx(0.1, rel=1e-6)
    # Second step by hand, grads 0.01 then 0.03: m = 0.009 + 0.003 = 0.0039 -> m_hat = 0.0039 / 0.19;
    # v = 0.9 * 1e-5 + 0.1 * 9e-4 = 9.9e-5 -> v_hat = 9.9e-5 / 0.19; step = 0.1 * m_hat / sqrt(v_hat).
    lam = LagrangeMultiplier(lr=0.1, betas=(0.9, 0.9))
    lam.step(2.01, 2.0)
    m_hat, v_hat = 0.0039 / 0.19, 9.9e-5 / 0.19
    assert lam.step(2.03, 2.0) == pytest.approx(0.1 + 0.1 * m_hat / (v_hat ** 0.5 + 1e-8), rel=1e-6)


def test_lambda_stays_non_negative_and_its_state_survives_a_restart():
    lam = LagrangeMultiplier(lr=0.1)
    for _ in range(5):
        lam.step(f=2.5, eps=2.0)  # violated: rises ~0.1 per step
    assert lam.value == pytest.approx(0.5, rel=1e-6)
    for _ in range(20):
        lam.step(f=1.0, eps=2.0)  # satisfied: falls back to the clamp
    assert lam.value == 0.0
    resumed = LagrangeMultiplier(lr=0.1)
    resumed.load(lam.state())
    assert resumed.step(2.2, 2.0) == lam.step(2.2, 2.0)


def test_the_age_head_sees_the_counterfactual_finding_label_in_cft():
    from cxrcf.config import PredictorArch
    from cxrcf.predictor import Predictor

    torch.manual_seed(0)
    pred = Predictor(PredictorArch(kind="cnn", resolution=32, width=8)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        own = pred(x)["age_loc"]
        fed0 = pred(x, finding=torch.tensor([0.0, 0.0]))["age_loc"]
        fed1 = pred(x, finding=torch.tensor([1.0, 1.0]))["age_loc"]
    # the label enters the age head linearly: the age difference is the label's weight
    w = pred.age_head.weight[0, -1]
    torch.testing.assert_close(fed1 - fed0, w.expand(2).detach())
    assert not torch.allclose(own, fed0) and not torch.allclose(own, fed1)
    import inspect

    from training.cft import CFTObjective
    assert 'finding=star["finding"]' in inspect.getsource(CFTObjective.forward)


def test_lagrangian_gradients():
    f = torch.tensor(2.5, requires_grad=True)
    aux = torch.tensor(1.0)
    loss = lagrangian(aux, f, eps=2.0, lam=3.0, damping=10.0)
    # L = 1 - (3 - 10*(-0.5)) * (-0.5) = 1 + 4 = 5; dL/dF = lam - d*(eps - F) = 3 + 5 = 8
    assert float(loss.detach()) == pytest.approx(5.0)
    loss.backward()
    assert float(f.grad) == pytest.approx(8.0)
    # dL/dlam = F - eps > 0 here: ascent raises lam
    lam = LagrangeMultiplier(lr=1.0, init=3.0)
    assert lam.step(2.5, 2.0) > 3.0


def test_cft_gives_the_parent_paths_their_learning_rate_factor_through_the_loop():
    from cxrcf.config import HVAEArch, OptimConfig, PredictorArch, SCMConfig, preset_params
    from cxrcf.hvae import HVAE
    from cxrcf.predictor import Predictor
    from cxrcf.scm import AttributeSCM
    from training.cft import CFTObjective
    from training.loop import make_optimizer, set_lr

    params = preset_params("smoke")
    arch: HVAEArch = params.generator.arch.model_copy(update={"parent_maps": ("finding",)})
    pred_arch = PredictorArch(kind="cnn", resolution=arch.resolution, width=8)
    parts = {"mode": "hard", "hvae_arch": arch, "hvae_state": HVAE(arch).state_dict(), "pred_arch": pred_arch,
             "pred_state": Predictor(pred_arch).state_dict(), "scm_cfg": SCMConfig(),
             "scm_state": AttributeSCM(SCMConfig()).state_dict(), "beta": 1.0, "eps": 1.0}
    optim = OptimConfig(steps=10, batch_size=4, lr=1e-3)
    plain = CFTObjective(**parts, cft_cfg=params.cft)
    trainable = [p for p in plain.model.parameters() if p.requires_grad]
    opt = make_optimizer(plain, trainable, optim)
    assert len(opt.param_groups) == 1 and [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in trainable]
    fast = CFTObjective(**parts, cft_cfg=params.cft.model_copy(update={"parent_lr_mult": 10.0, "train": "all"}))
    trainable = [p for p in fast.model.parameters() if p.requires_grad]
    opt = make_optimizer(fast, trainable, optim)
    rest, paths = opt.param_groups
    assert {id(p) for p in paths["params"]} == {id(p) for p in fast.model.parent_path_parameters()}
    assert {id(p) for p in rest["params"] + paths["params"]} == {id(p) for p in trainable}
    assert (rest["lr"], paths["lr"]) == (1e-3, pytest.approx(1e-2))
    set_lr(opt, 5e-4)  # the warm-up's rate each step keeps the factor
    assert (rest["lr"], paths["lr"]) == (5e-4, pytest.approx(5e-3))
    # the predictor and the SCM stay out of every group
    frozen = {id(p) for p in list(fast.predictor.parameters()) + list(fast.scm.parameters())}
    assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}


def test_cft_on_adapters_trains_only_them_and_draws_k_by_its_weights():
    from cxrcf.config import PredictorArch, SCMConfig, preset_params
    from cxrcf.hvae import HVAE
    from cxrcf.predictor import Predictor
    from cxrcf.scm import AttributeSCM
    from training.cft import CFT_PARENTS, CFTObjective
    from training.loop import step_rng

    params = preset_params("smoke")
    arch = params.generator.arch
    pred_arch = PredictorArch(kind="cnn", resolution=arch.resolution, width=8)
    cfg = params.cft.model_copy(update={"k_weights": {"finding": 3.0, "sex": 1.0}})
    objective = CFTObjective(mode="hard", hvae_arch=arch, hvae_state=HVAE(arch).state_dict(), pred_arch=pred_arch,
                             pred_state=Predictor(pred_arch).state_dict(), scm_cfg=SCMConfig(),
                             scm_state=AttributeSCM(SCMConfig()).state_dict(), beta=1.0, eps=1.0, cft_cfg=cfg)
    adapters = {id(p) for p in objective.model.adapter_parameters()}
    assert {id(p) for p in objective.model.parameters() if p.requires_grad} == adapters
    assert next(g["params"] for g in objective.param_groups()) == objective.model.adapter_parameters()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    parents = {"sex": torch.tensor([0.0, 1, 0, 1]), "race": torch.tensor([0, 1, 2, 0]),
               "age": torch.tensor([30.0, 50, 70, 40]), "finding": torch.tensor([0.0, 1, 1, 0])}
    drawn = []
    for step in range(40):
        out = objective(x, parents, step_rng(0, step, 0, "cpu"))
        drawn.append(next(k for k in CFT_PARENTS if out[f"k_{k}"] == 1))
    assert set(drawn) <= {"finding", "sex"} and 20 <= drawn.count("finding") <= 38
