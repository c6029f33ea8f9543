"""The attribute SCM of SCIENCE.md section 2: sex, race, age roots; age -> finding.

Mechanisms:
- sex ~ Bernoulli(sigmoid(sex_logit)), race ~ Categorical(race_logits): roots whose abducted
  "noise" is simply the observed value.
- age (model space a = age/100*2-1) = g^-1(u), u ~ N(0, 1), with g a strictly increasing map
  g(a) = alpha*a + beta + sum_k w_k tanh(s_k a + b_k) (alpha, w_k, s_k > 0; K = cfg.flow_bins units).
  Fitting uses g directly (exact density via g'); sampling inverts it by bisection, exact to float64
  precision because g is monotone and bracketed (|tanh| <= 1).
- finding = argmax(MLP(a) + eps), eps ~ Gumbel(0, 1)^2. Abduction draws eps from its posterior given
  the observed class (top-down Gumbel sampling), so re-predicting at the factual age reproduces it.

The API takes and returns parents in the torch convention of docs/CONTRACTS.md (age in years).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cxrcf.attributes import AGE_MAX, AGE_MIN, ATTRIBUTES, N_RACE, age_from_model, age_to_model
from cxrcf.config import SCMConfig
from cxrcf.errors import CxrcfError

_BISECT_STEPS = 80


def _inv_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _gumbel(shape, generator, device, dtype=torch.float64) -> torch.Tensor:
    # float64 keeps the posterior Gumbel construction free of ties between the max and the rest.
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-12)))


def _as_parents(parents: dict, n: int | None = None) -> dict[str, torch.Tensor]:
    missing = [a for a in ATTRIBUTES if a not in parents]
    if missing:
        raise CxrcfError(f"parents: missing {', '.join(missing)}")
    out = {
        "sex": torch.as_tensor(parents["sex"]).float(),
        "race": torch.as_tensor(parents["race"]).long(),
        "age": torch.as_tensor(parents["age"]).float(),
        "finding": torch.as_tensor(parents["finding"]).float(),
    }
    sizes = {a: tuple(v.shape) for a, v in out.items()}
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise CxrcfError(f"parents: every attribute must be a 1-D tensor of the same length, got shapes {sizes}")
    return out


class AttributeSCM(nn.Module):
    def __init__(self, cfg: SCMConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        k = cfg.flow_bins
        self.sex_logit = nn.Parameter(torch.zeros(()))
        self.race_logits = nn.Parameter(torch.zeros(N_RACE))
        # Start near the identity-like scale of model-space ages (spread ~0.4) so early steps are sane.
        self.age_alpha = nn.Parameter(torch.tensor(_inv_softplus(2.0)))
        self.age_beta = nn.Parameter(torch.zeros(()))
        self.age_w = nn.Parameter(torch.full((k,), _inv_softplus(0.1)) + 0.01 * torch.randn(k, generator=gen))
        self.age_s = nn.Parameter(torch.full((k,), _inv_softplus(2.0)) + 0.1 * torch.randn(k, generator=gen))
        self.age_b = nn.Parameter(torch.linspace(-2.0, 2.0, k) + 0.1 * torch.randn(k, generator=gen))
        h = cfg.finding_hidden
        self.finding_mlp = nn.Sequential(nn.Linear(1, h), nn.Tanh(), nn.Linear(h, 2))
        with torch.no_grad():
            for layer in self.finding_mlp:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=gen)
                    layer.bias.uniform_(-bound, bound, generator=gen)

    # ------------------------------------------------------------------------------- age flow
    def _flow_params(self, dtype=torch.float32):
        return (F.softplus(self.age_alpha).to(dtype), self.age_beta.to(dtype), F.softplus(self.age_w).to(dtype),
                F.softplus(self.age_s).to(dtype), self.age_b.to(dtype))

    def age_to_noise(self, age_model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, log g'(a)) for model-space ages a."""
        alpha, beta, w, s, b = self._flow_params(age_model.dtype)
        t = torch.tanh(age_model.unsqueeze(-1) * s + b)
        u = alpha * age_model + beta + (w * t).sum(-1)
        du = alpha + (w * s * (1 - t * t)).sum(-1)
        return u, torch.log(du)

    def noise_to_age(self, u: torch.Tensor) -> torch.Tensor:
        """Model-space age g^-1(u), by bisection in float64."""
        with torch.no_grad():
            alpha, beta, w, s, b = self._flow_params(torch.float64)
            u64 = u.detach().double()
            total = w.sum()
            lo = (u64 - beta - total) / alpha
            hi = (u64 - beta + total) / alpha
            for _ in range(_BISECT_STEPS):
                mid = 0.5 * (lo + hi)
                g_mid = alpha * mid + beta + (w * torch.tanh(mid.unsqueeze(-1) * s + b)).sum(-1)
                below = g_mid < u64
                lo = torch.where(below, mid, lo)
                hi = torch.where(below, hi, mid)
            return (0.5 * (lo + hi)).to(u.dtype if u.is_floating_point() else torch.float32)

    # ------------------------------------------------------------------------------ mechanisms
    def finding_logits(self, age_years: torch.Tensor) -> torch.Tensor:
        return self.finding_mlp(age_to_model(age_years.float()).unsqueeze(-1))

    def log_prob(self, parents: dict) -> torch.Tensor:
        """Joint log-likelihood per row; the age term is a density in model space."""
        p = _as_parents(parents)
        dev = self.sex_logit.device
        sex, race, age, finding = (p[a].to(dev) for a in ("sex", "race", "age", "finding"))
        lp_sex = -F.binary_cross_entropy_with_logits(self.sex_logit.expand_as(sex), sex, reduction="none")
        lp_race = torch.log_softmax(self.race_logits, -1)[race]
        u, log_det = self.age_to_noise(age_to_model(age))
        lp_age = -0.5 * u * u - 0.5 * math.log(2 * math.pi) + log_det
        lp_finding = torch.log_softmax(self.finding_logits(age), -1).gather(1, finding.long().unsqueeze(1)).squeeze(1)
        return lp_sex + lp_race + lp_age + lp_finding

    def fit(self, parents: dict, log_every: int = 0) -> list[float]:
        """Maximum likelihood, full batch, Adam for cfg.steps; returns the mean NLL after each step."""
        p = {k: v.to(self.sex_logit.device) for k, v in _as_parents(parents).items()}
        if len(p["sex"]) == 0:
            raise CxrcfError("parents: no rows to fit the SCM on")
        opt = torch.optim.Adam(self.parameters(), lr=self.cfg.lr)
        history: list[float] = []
        self.train()
        for step in range(1, self.cfg.steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = -self.log_prob(p).mean()
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            if log_every and (step % log_every == 0 or step == self.cfg.steps):
                print(f"scm step {step}/{self.cfg.steps} nll={history[-1]:.4f}", flush=True)
        self.eval()
        return history

    # ----------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """n ancestral samples; ages are clipped to the valid 0-120 year range."""
        dev = self.sex_logit.device
        sex = (torch.rand(n, generator=generator, device=dev) < torch.sigmoid(self.sex_logit)).float()
        race = torch.multinomial(torch.softmax(self.race_logits, -1).expand(n, N_RACE), 1,
                                 generator=generator).squeeze(1)
        u = torch.randn(n, generator=generator, device=dev)
        age = age_from_model(self.noise_to_age(u)).clamp(AGE_MIN, AGE_MAX)
        eps = _gumbel((n, 2), generator, dev)
        finding = (self.finding_logits(age).double() + eps).argmax(-1).float()
        return {"sex": sex, "race": race, "age": age, "finding": finding}

    @torch.no_grad()
    def abduct(self, parents: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Exogenous noise of each mechanism given observed parents.

        `finding` noise (N, 2) is a draw from the Gumbel posterior: the observed class's perturbed logit
        is the max T ~ Gumbel(logsumexp(logits)); each other class is a Gumbel truncated below T.
        """
        dev = self.sex_logit.device
        p = {k: v.to(dev) for k, v in _as_parents(parents).items()}
        u, _ = self.age_to_noise(age_to_model(p["age"]))
        logits = self.finding_logits(p["age"]).double()
        n = logits.shape[0]
        top = torch.logsumexp(logits, -1) + _gumbel((n,), generator, dev)
        g = logits + _gumbel((n, 2), generator, dev)
        below = top.unsqueeze(1) - F.softplus(top.unsqueeze(1) - g)
        observed = p["finding"].long().unsqueeze(1)
        z = below.scatter(1, observed, top.unsqueeze(1))
        return {"sex": p["sex"], "race": p["race"], "age": u, "finding": z - logits}

    @torch.no_grad()
    def counterfactual(self, parents: dict, do: dict, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        """Abduction, action, prediction (SCIENCE.md section 2).

        Intervened values are set; age is intervened or kept; finding is set when intervened,
        recomputed from its abducted Gumbel noise when age (and not finding) is intervened, else kept.
        """
        dev = self.sex_logit.device
        p = {k: v.to(dev) for k, v in _as_parents(parents).items()}
        n = len(p["sex"])
        unknown = sorted(set(do) - set(ATTRIBUTES))
        if unknown:
            raise CxrcfError(f"do: unknown attribute(s) {unknown}; expected some of {', '.join(ATTRIBUTES)}")
        out = {k: v.clone() for k, v in p.items()}
        for attr, value in do.items():
            v = torch.as_tensor(value, device=dev)
            v = v.long() if attr == "race" else v.float()
            if v.dim() > 1 or (v.dim() == 1 and len(v) != n):
                raise CxrcfError(f"do: {attr} must be a scalar or a tensor of length {n}, got shape {tuple(v.shape)}")
            out[attr] = v.expand(n).clone()
        if "age" in do and "finding" not in do:
            eps = self.abduct(p, generator)["finding"]
            out["finding"] = (self.finding_logits(out["age"]).double() + eps).argmax(-1).float()
        return out
