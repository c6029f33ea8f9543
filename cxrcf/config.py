"""Every stage's parameters as strict, frozen pydantic models.

`params.yaml` names a `preset` (smoke, cpu, paper) and may override any key; the preset supplies
every key the file leaves out. Unknown keys and bad values fail at start with one line naming the
key, the value and the reason (`load_params`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxrcf.errors import CxrcfError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------- types every room shares
Mode = Literal["hard", "soft"]  # a counterfactual fine-tuning mode
ModelMode = Literal["none", "hard", "soft"]  # what a generator is: the plain HVAE, or CFT-tuned in a mode
MODES: tuple[str, ...] = get_args(Mode)
MODEL_MODES: tuple[str, ...] = get_args(ModelMode)
TU_RANGE = "(0, 1]"
# t_u, the pixel-noise temperature of a counterfactual (SCIENCE.md section 3): one rule, (0, 1]
TU = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


def check_t_u(value: float, where: str = "t_u") -> float:
    """`value` as a t_u, or CxrcfError naming `where` (the same rule as the TU field type)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise CxrcfError(f"{where}: {value!r} must be in {TU_RANGE}")
    return float(value)


# ----------------------------------------------------------------------------------------- data
class SplitConfig(Strict):
    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train + self.val + self.test:g}")
        return self


class SynthConfig(Strict):
    """SynthCXR generation settings (the default dataset)."""

    n_images: int = Field(20000, ge=10)
    resolution: int = Field(64, ge=16, le=224)
    seed: int = 0
    split: SplitConfig = SplitConfig()
    # Mechanism strengths (see cxrcf/synth.py); defaults keep age -> finding moderate.
    finding_age_slope: float = 1.2
    finding_bias: float = -0.9
    p_female: float = Field(0.5, gt=0, lt=1)
    race_probs: tuple[float, float, float] = (0.6, 0.15, 0.25)

    @field_validator("race_probs")
    @classmethod
    def _probs(cls, v):
        if any(p <= 0 for p in v) or abs(sum(v) - 1) > 1e-6:
            raise ValueError("race_probs must be 3 positive numbers summing to 1")
        return v


class DataConfig(Strict):
    root: str = "data"
    synth: SynthConfig = SynthConfig()


# ---------------------------------------------------------------------------------------- compute
class RayConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    storage_path: str = "artifacts/ray"  # made absolute at run time (Ray Train requires it)
    max_failures: int = Field(1, ge=0)


class MlflowConfig(Strict):
    experiment: str = "cxrcf"


# ----------------------------------------------------------------------------------------- models
class HVAEArch(Strict):
    """Conditional HVAE architecture from reference-style string specs, e.g. enc '32b1d2,16b3d2,...'."""

    resolution: int = Field(32, ge=8)
    enc_arch: str
    dec_arch: str
    widths: tuple[int, ...]
    z_dim: int = Field(16, ge=1)
    bottleneck: int = Field(4, ge=1)
    z_max_res: int = Field(32, ge=1)  # stochastic blocks only at resolutions <= this
    context_dim: int = 6
    input_channels: int = 1
    # Ceiling on the decoder's per-pixel scale (images in [-1, 1]). A wide learned scale lets the
    # likelihood explain sex and effusion cues as noise, so the counterfactual returns its input
    # (SCIENCE.md section 9); e^2 is no ceiling at all.
    pixel_scale_max: float = Field(7.389, gt=0)
    # Parents whose effect on the pixel mean is (also) a learned per-pixel linear template, fitted by least
    # squares on the training images before pretraining: additive mechanisms (soft-tissue shadows,
    # density) are then right from step 0 instead of after thousands of steps (SCIENCE.md section 9).
    parent_template: tuple[Literal["sex", "race", "age", "finding"], ...] = ()
    # The decoder blocks' projections of the parents start at zero, so the deep path's response to a
    # parent grows only where the likelihood asks for it rather than starting as unspecific noise edits.
    zero_parent_init: bool = False
    # Parents that reach the decoder's generative path through the template alone (the posterior still
    # sees them): their counterfactual edit is exactly the template's, which suits a parent whose
    # mechanism is additive, such as SynthCXR's sex (breast and shoulder shadows).
    template_only: tuple[Literal["sex", "race", "age", "finding"], ...] = ()
    # Parents that also enter every decoder block as a learned spatial feature map (zero at start) times the
    # parent's context value. The ELBO leaves these at ~0 (the latents already explain the image); CFT can
    # then paint a located edit, such as fluid at the lung bases, in a few hundred steps where the
    # spatially uniform projection alone had barely moved do(finding) in 1,400 (issue 14, session 8 note:
    # the edit is then effective but the same blob on every image, so it is off in the presets).
    parent_maps: tuple[Literal["race", "age", "finding"], ...] = ()
    # Decoder resolutions whose blocks end with a finding-gated adapter, h += (1 - f) A0(h) + f A1(h) (each A a
    # 3x3 convolution, GELU, zero-initialised 1x1): the do(finding) edit is then a function of the image's own
    # features, not a parent-only template (issue 14). Zero at start and frozen in pretraining; CFT trains them.
    gated_adapters: tuple[int, ...] = ()
    # Where an intervention flips the finding, the counterfactual edit x* - x is soft-thresholded at this many
    # pixel units: the fluid is a large local change, and everything under the threshold is the decoder's
    # texture leakage, which made do(finding) land farther from the truth than x (SCIENCE.md section 9).
    gated_edit_threshold: float = Field(0.0, ge=0)


class OptimConfig(Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.9)
    warmup_steps: int = Field(100, ge=0)
    ema_rate: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(100.0, gt=0)
    grad_skip: float = Field(1000.0, gt=0)  # skip updates whose gradient norm exceeds this
    val_every: int = Field(500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    seed: int = 0
    mixed_precision: bool = True  # used on GPU only


class PredictorArch(Strict):
    kind: Literal["cnn", "resnet18"] = "cnn"
    resolution: int = Field(32, ge=8)
    width: int = Field(32, ge=4)
    dropout: float = Field(0.2, ge=0, lt=1)
    # Which half of the training split it learns from (a seeded split of the train ids): the guidance
    # and the evaluation predictor take disjoint halves, so the evaluator shares no images with the guide.
    train_half: Literal["all", "first", "second"] = "all"


class AdversarialConfig(Strict):
    """L2 PGD adversarial training (Madry et al. 2018): each batch is trained clean and at its worst case within
    an L2 ball of `eps` (images in [-1, 1]). A robust guide's gradients point at the evidence itself, so CFT
    edits the fluid instead of painting texture that fools the guide (issue 14: finding-gradient energy on the
    effusion 60% against 22%)."""

    eps: float = Field(0.0, ge=0)  # 0 = clean training
    steps: int = Field(3, ge=1)


class PredictorConfig(Strict):
    arch: PredictorArch
    optim: OptimConfig
    adversarial: AdversarialConfig = AdversarialConfig()


class PredictorsConfig(Strict):
    guidance: PredictorConfig
    evaluation: PredictorConfig


class SCMConfig(Strict):
    steps: int = Field(2000, ge=1)
    lr: float = Field(1e-2, gt=0)
    flow_bins: int = Field(8, ge=2)
    finding_hidden: int = Field(16, ge=1)
    seed: int = 0


class GeneratorConfig(Strict):
    arch: HVAEArch
    beta: float = Field(9.0, gt=0)
    # The KL weight moves linearly from beta_start to beta over the first beta_warmup_steps (the
    # reference's warm-up is beta_start = 0). beta_start > beta anneals from above instead: latents
    # are dear at first, so the decoder learns what the parents explain before the latents take the rest.
    beta_start: float = Field(0.0, ge=0)
    beta_warmup_steps: int = Field(0, ge=0)
    free_bits: float = Field(0.0, ge=0)  # nats per latent channel per block (reference `free_bits`)
    optim: OptimConfig

    def beta_at(self, step: int) -> float:
        if self.beta_warmup_steps <= 0:
            return self.beta
        f = min(1.0, (step + 1) / self.beta_warmup_steps)
        return self.beta_start + (self.beta - self.beta_start) * f


class CFTConfig(Strict):
    optim: OptimConfig
    damping: float = Field(10.0, ge=0)
    lambda_lr: float = Field(0.1, gt=0)
    lambda_init: float = Field(0.0, ge=0)
    slack: float = Field(0.0, ge=0)  # nats/pixel above the pretrained ELBO level eps
    t_u: TU = 1.0
    modes: tuple[Mode, ...] = MODES  # the modes `cxrcf study` sweeps
    # Early stopping at the truth's effectiveness: every optim.val_every steps the EMA weights are scored on
    # select_images validation images and the exported checkpoint is the one whose do(sex)/do(finding) AUC
    # is closest to, and not above, the true counterfactuals' (SynthCXR) or target_auc (real data).
    select_images: int = Field(1000, ge=16)
    target_auc: dict[Literal["sex", "finding"], float] | None = None
    # Learning-rate factor for the decoder's generative parent paths (the per-block parent projections and
    # parent maps): what CFT has to change is mostly there, and at the base rate it moves too little in a
    # CPU-sized budget. 1 = the reference's single rate.
    parent_lr_mult: float = Field(1.0, gt=0)
    # What CFT trains: every generator weight (the reference), or only the finding-gated adapters
    # (HVAEArch.gated_adapters), which leaves the pretrained mechanisms of the other parents as they are.
    train: Literal["all", "adapters"] = "all"
    # Relative odds of drawing each parent as the batch's intervention (the reference draws uniformly).
    k_weights: dict[Literal["race", "sex", "finding", "age"], float] | None = None

    @field_validator("k_weights")
    @classmethod
    def _some_weight(cls, v):
        if v is not None and (any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values())):
            raise ValueError("weights must be >= 0 with at least one > 0")
        return v


class GeneratorCheckConfig(Strict):
    """The generator check's floors (pipelines/generator_check.py); a failed check refuses promotion."""

    min_auc_sex: float = Field(0.8, ge=0, le=1)  # do(sex) effectiveness under the evaluation predictor
    min_auc_finding: float = Field(0.6, ge=0, le=1)
    # Linear probe on abducted latents -> factual attribute. Reported, not gated by default: latents that
    # are the exogenous noise they are meant to be are independent of the parents, so an ideal model
    # scores ~0.5 here; what they must carry is the image's own evidence (min_probe_r2).
    min_probe_auc: float | None = Field(None, ge=0, le=1)
    min_probe_r2: float = Field(0.2, le=1)  # ... -> the simulator's per-image evidence
    # L1(x*, truth) / L1(x, truth) per intervention, below this, over the images whose truth x determines
    max_l1_ratio: float = Field(1.0, gt=0)
    probe_images: int = Field(1000, ge=12)


class EvaluateConfig(Strict):
    t_u: TU = 1.0
    extra_t_u: tuple[TU, ...] = (0.1,)  # reported beside t_u (SCIENCE.md section 8)
    max_images: int = Field(2000, ge=1)
    reversibility_images: int = Field(500, ge=1)  # the first N evaluated images also go back to x
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    check: GeneratorCheckConfig = GeneratorCheckConfig()


class StudyConfig(Strict):
    slacks: tuple[float, ...] = (0.0, 0.02, 0.05)
    seeds: tuple[int, ...] = (0, 1, 2)  # the verdict needs >= 3 CFT seeds (pipelines/verdict.py)


class GatesConfig(Strict):
    """Promotion gates: effectiveness floors (AUC for binaries, macro AUC for race, MAE ceiling for age)."""

    min_auc: dict[str, float] = {"sex": 0.7, "race": 0.6, "finding": 0.7}
    max_age_mae: float = Field(25.0, gt=0)
    max_amplification: float = Field(1.0, description="ceiling on the worst AMP(j|do k), log-odds")
    regression_tolerance: float = Field(0.02, ge=0)
    # every check of the evaluation's generator check must pass (evaluate.check holds their floors)
    generator_check: bool = True

    @field_validator("min_auc")
    @classmethod
    def _known(cls, v):
        bad = set(v) - {"sex", "race", "finding"}
        if bad:
            raise ValueError(f"unknown attribute(s) {sorted(bad)}")
        return v


class RegistryConfig(Strict):
    generator_name: str = "cxrcf-generator"
    guidance_predictor_name: str = "cxrcf-guidance-predictor"
    evaluation_predictor_name: str = "cxrcf-evaluation-predictor"
    promote_mode: Mode = "soft"
    gates: GatesConfig = GatesConfig()


DIRECT_PORT_SPAN = 100  # ports from serve.direct_port that replicas may take (a rolling update needs a spare)
# Hard caps of the request schema (serving/schemas.py): pydantic refuses more before building the
# request; serve.max_interventions and serve.max_image_id_chars may only lower them.
INTERVENTIONS_CAP = 64
IMAGE_ID_CAP = 128


class CanaryConfig(Strict):
    """Traffic between the served alias (`serve.model_alias`, the champion) and a candidate alias.

    Each request's X-Request-ID decides, by hash, whether the candidate answers it (`weight`) and,
    if the champion answers, whether a copy goes to the candidate too (`shadow`): the copy's answer
    is only scored by the evaluation predictor (online effectiveness), never returned.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    alias: str = Field("candidate", min_length=1)
    weight: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="share answered by the candidate")
    shadow: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                          description="share of the champion's requests mirrored to the candidate")
    # mirrored requests a replica holds at once; more are skipped (counted) rather than queued
    max_shadow_pending: int = Field(8, ge=1)

    @property
    def on(self) -> bool:
        return self.weight > 0 or self.shadow > 0


class ServeConfig(Strict):
    """`cxrcf serve` and every replica's run-time settings: the whole section travels to the
    replicas in the deployment's user_config, so a `serve deploy` config can change it at run time."""

    # strict: a quoted "64" in params.yaml or a deploy config is refused, not silently converted
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_alias: str = "champion"
    num_replicas: int | Literal["auto"] = 1
    max_replicas: int = Field(2, ge=1)
    # CPUs per replica, which is also its torch thread count for large batches (parallel_min_batch)
    num_cpus: float = Field(2.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    reload_poll_s: float = Field(5.0, gt=0)
    # Batches smaller than this run on one torch thread: a small pass gains little from a second
    # thread, whose spinning takes the CPU that the replica's event loop needs to parse requests.
    parallel_min_batch: int = Field(12, ge=1)
    # Ray Serve direct ingress: every replica also answers HTTP on its own port, from
    # direct_port upwards, so that clients can skip the Serve proxy (port keeps working).
    direct_ingress: bool = True
    direct_port: int = Field(8100, ge=1, le=65536 - DIRECT_PORT_SPAN)
    # what a request that gives no t_u gets (the pixel-noise temperature, SCIENCE.md section 3)
    t_u: TU = 1.0

    # budgets, checked from the request and the PNG header before any decoding or inference
    max_body_bytes: int = Field(8_000_000, ge=1024)
    max_interventions: int = Field(8, ge=1, le=INTERVENTIONS_CAP)
    max_image_id_chars: int = Field(IMAGE_ID_CAP, ge=1, le=IMAGE_ID_CAP)
    max_pixels: int = Field(1024 * 1024, ge=64, description="width x height of an input image")
    max_reply_bytes: int = Field(16_000_000, ge=100_000,
                                 description="worst case of the reply: every counterfactual PNG at the input's size")
    # backpressure and deadlines. Serve's proxy counts a burst's requests as queued until it has
    # assigned them to replicas, so max_queued_requests is also the largest burst one proxy takes.
    max_queued_requests: int = Field(64, ge=1, description="requests Serve queues beyond max_ongoing_requests, "
                                     "per proxy and per replica's direct port; more are answered 503")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503 for overload")
    request_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False,
                                     description="a request's deadline inside the replica (504)")
    batch_timeout_s: float = Field(20.0, gt=0, allow_inf_nan=False,
                                   description="one batched forward pass's deadline (504 for its batch)")
    unhealthy_after_batch_timeouts: int = Field(3, ge=1, description="consecutive batch timeouts that fail check_health")
    health_check_period_s: float = Field(5.0, gt=0)
    # registry faults (the policy: serving/policy.py)
    stale_after_s: float = Field(60.0, gt=0, description="alias check age after which the alias is reported stale")
    reload_backoff_s: float = Field(5.0, gt=0, description="first retry delay of a version that failed to load")
    reload_backoff_max_s: float = Field(600.0, gt=0)
    registry_timeout_s: float = Field(5.0, gt=0, description="MLflow HTTP timeout in replicas (no minute-long retries)")
    # last-known-good copies of served versions; None: $CXRCF_SERVE_CACHE, else ~/.cache/cxrcf/serving
    lkg_dir: str | None = None
    canary: CanaryConfig = CanaryConfig()

    @model_validator(mode="after")
    def _batches_can_fill(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size or batches never fill")
        return self

    @model_validator(mode="after")
    def _backoff_grows(self):
        if self.reload_backoff_max_s < self.reload_backoff_s:
            raise ValueError(f"reload_backoff_max_s {self.reload_backoff_max_s:g} is below reload_backoff_s "
                             f"{self.reload_backoff_s:g}")
        return self

    @model_validator(mode="after")
    def _canary_is_another_alias(self):
        if self.canary.on and self.canary.alias == self.model_alias:
            raise ValueError(f"canary.alias {self.canary.alias!r} is model_alias itself; name the candidate's alias")
        return self

    @model_validator(mode="after")
    def _ports_apart(self):
        if self.direct_ingress and self.port in self.direct_ports:
            raise ValueError(f"port {self.port} lies in the replicas' direct ports {self.direct_port}-"
                             f"{self.direct_ports[-1]} (direct_port {self.direct_port}); move one of them")
        return self

    @property
    def direct_ports(self) -> range:
        return range(self.direct_port, self.direct_port + DIRECT_PORT_SPAN)

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches a server bound to `host` (a wildcard means loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


class AugmentConfig(Strict):
    batch_size: int = Field(64, ge=1)
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(0.5, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    t_u: TU = 1.0
    seed: int = 0


class Params(Strict):
    preset: Literal["smoke", "cpu", "paper"] = "cpu"
    data: DataConfig = DataConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    predictors: PredictorsConfig
    scm: SCMConfig = SCMConfig()
    generator: GeneratorConfig
    cft: CFTConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    study: StudyConfig = StudyConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _adapters_to_train(self):
        if self.cft.train == "adapters" and not self.generator.arch.gated_adapters:
            raise ValueError("cft.train = 'adapters' needs generator.arch.gated_adapters (the decoder has none)")
        return self


# -------------------------------------------------------------------------------------- presets
def _optim(**kw) -> dict[str, Any]:
    return kw


# The reference 64x64 configuration of issue 3's speed target (also the HVAE benchmark's baseline).
REFERENCE64_ARCH = dict(
    resolution=64,
    enc_arch="64b1d2,32b3d2,16b3d2,8b3d8,1b2",
    dec_arch="1b2,8b3,16b4,32b3,64b2",
    widths=(32, 64, 96, 128, 160),
    z_dim=16,
    bottleneck=4,
    z_max_res=32,
)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data": {"synth": {"n_images": 400, "resolution": 32}},
        "predictors": {
            "guidance": {"arch": {"kind": "cnn", "resolution": 32, "width": 8, "train_half": "first"},
                         "optim": _optim(steps=30, batch_size=32, lr=1e-3, warmup_steps=0, val_every=15,
                                         checkpoint_every=15, seed=1),
                         "adversarial": {"eps": 0.5, "steps": 1}},
            "evaluation": {"arch": {"kind": "cnn", "resolution": 24, "width": 12, "train_half": "second"},
                           "optim": _optim(steps=30, batch_size=32, lr=1e-3, warmup_steps=0, val_every=15,
                                           checkpoint_every=15, seed=2)},
        },
        "scm": {"steps": 100},
        "generator": {
            "arch": dict(resolution=32, enc_arch="32b1d2,16b1d2,8b1d8,1b1", dec_arch="1b1,8b1,16b1,32b1",
                         widths=(8, 16, 16, 32), z_dim=4, bottleneck=2, z_max_res=16, gated_adapters=(16, 32),
                         gated_edit_threshold=0.1),
            "beta": 4.0,
            "optim": _optim(steps=30, batch_size=32, lr=1e-3, warmup_steps=5, val_every=15,
                            checkpoint_every=15),
        },
        "cft": {"optim": _optim(steps=10, batch_size=16, lr=1e-4, warmup_steps=0, val_every=5,
                                checkpoint_every=5), "train": "adapters"},
        "evaluate": {"max_images": 64, "batch_size": 64},
        "study": {"slacks": (0.0, 0.05), "seeds": (0,)},
        "augment": {"batch_size": 16},
        "serve": {"max_batch_size": 8, "max_ongoing_requests": 16},
        # 30-step smoke models are never counterfactual models: the check is computed and reported, not gated
        "registry": {"gates": {"generator_check": False}},
    },
    "cpu": {
        "data": {"synth": {"n_images": 20000, "resolution": 64}},
        "predictors": {
            # A small CNN as guidance let CFT fool it without painting effusions: under the independent
            # evaluation predictor do(finding) scored AUC 0.34 against 0.81 under the CNN itself; with a
            # ResNet-18 guide, 0.72-0.76. The evaluator is independent of the guide: another resolution
            # (24 px, so it never learns the guide's finest cues), another seed, the other half of the data.
            # The guide is trained adversarially (L2 PGD, eps 0.5): with clean training 22% of its finding-gradient
            # energy fell on the effusion (1.6% of the pixels) and CFT painted texture; robust, 60% (issue 14 note).
            "guidance": {"arch": {"kind": "resnet18", "resolution": 32, "width": 16, "train_half": "first"},
                         "optim": _optim(steps=700, batch_size=64, lr=1e-3, val_every=350,
                                         checkpoint_every=350, seed=1),
                         "adversarial": {"eps": 0.5, "steps": 3}},
            "evaluation": {"arch": {"kind": "resnet18", "resolution": 24, "width": 16, "train_half": "second"},
                           "optim": _optim(steps=700, batch_size=64, lr=1e-3, val_every=350,
                                           checkpoint_every=350, seed=2)},
        },
        "scm": {"steps": 2000},
        "generator": {
            # Measured on 1,000 test images (issue 14 note): with a learned pixel scale (~0.17) the decoder
            # explained sex cues as noise and do(sex) scored AUC 0.05 before CFT; the scale ceiling 0.05 plus
            # the least-squares parent template (sex through the template alone) gives 0.92. With the exact
            # far-tail likelihood the latents carry the image (KL ~0.15 nats/pixel, breast-evidence probe
            # R^2 0.30) and L1 to the true do(sex) / do(race) is 0.45x / 0.48x the unedited image's.
            "arch": dict(resolution=32, enc_arch="32b1d2,16b2d2,8b2d8,1b1", dec_arch="1b1,8b2,16b2,32b1",
                         widths=(16, 32, 48, 64), z_dim=8, bottleneck=4, z_max_res=16, pixel_scale_max=0.05,
                         parent_template=("age", "race", "sex"), template_only=("sex",), zero_parent_init=True,
                         gated_adapters=(16, 32), gated_edit_threshold=0.1),
            "beta": 4.0,
            "optim": _optim(steps=2500, batch_size=32, lr=1e-3, val_every=500, checkpoint_every=500),
        },
        # 1050 steps, three scored checkpoints (600 validation images each) for the early stop at the truth.
        # On the latent-using generator (issue 14 note) do(finding) under the guide moved 0.17 -> 0.20 (1050)
        # -> 0.24 (1400 steps): more steps do not buy the finding edit, and 1400 put `make run` over budget.
        # EMA 0.995: with 0.999 the exported weights lag far behind a run this short.
        # CFT trains only the finding-gated adapters (the other parents' pretrained mechanisms already beat doing
        # nothing), drawing do(finding) 20x as often as each other parent: a permuted batch flips the finding of
        # only ~44% of its images, and with 4x in 2,000 steps do(finding) reached AUC 0.42, with 20x in 2,500
        # 0.67 (issue 14 note). Effectiveness rises late and fast, so the EMA weights are scored every 250 steps
        # for the early stop at the truth.
        "cft": {"optim": _optim(steps=2500, batch_size=32, lr=1e-3, warmup_steps=0, val_every=250,
                                checkpoint_every=500, ema_rate=0.995), "slack": 0.02, "select_images": 600,
                "train": "adapters", "k_weights": {"race": 1.0, "sex": 1.0, "finding": 20.0, "age": 1.0}},
    },
    "paper": {
        "data": {"synth": {"n_images": 20000, "resolution": 192}},
        "predictors": {
            "guidance": {"arch": {"kind": "resnet18", "resolution": 192, "width": 64, "train_half": "first"},
                         "optim": _optim(steps=20000, batch_size=32, lr=1e-3, seed=1)},
            "evaluation": {"arch": {"kind": "resnet18", "resolution": 128, "width": 64, "dropout": 0.2,
                                    "train_half": "second"},
                           "optim": _optim(steps=20000, batch_size=32, lr=1e-3, weight_decay=0.1, seed=2)},
        },
        "generator": {
            "arch": dict(resolution=192, enc_arch="192b1d2,96b3d2,48b7d2,24b11d2,12b7d2,6b3d6,1b2",
                         dec_arch="1b2,6b4,12b8,24b12,48b8,96b4,192b2",
                         widths=(32, 64, 96, 128, 160, 192, 512), z_dim=16, bottleneck=4, z_max_res=96),
            "beta": 9.0,
            "optim": _optim(steps=200000, batch_size=24, lr=1e-3),
        },
        "cft": {"optim": _optim(steps=5000, batch_size=10, lr=1e-4, warmup_steps=0)},
        "ray": {"use_gpu": True},
    },
}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path = value: reason`."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        reason = e["msg"]
        if e["type"] == "extra_forbidden":
            reason = "unknown key"
        # a model-level check has no key of its own: its message names the keys
        lines.append(f"{source}: {reason}" if key == "(root)" else f"{source}: {key}{shown}: {reason}")
    return "\n".join(lines)


def resolve_params(raw: dict | None, source: str = "params") -> Params:
    """Preset defaults deep-merged with `raw`, validated."""
    raw = dict(raw or {})
    preset = raw.get("preset", "cpu")
    if preset not in PRESETS:
        raise CxrcfError(f"{source}: preset = {preset!r}: unknown preset; expected one of {', '.join(PRESETS)}")
    merged = deep_merge(PRESETS[preset], raw)
    merged["preset"] = preset
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise CxrcfError(format_validation_error(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    import yaml

    path = Path(path)
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise CxrcfError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise CxrcfError(f"{path}: expected a mapping of sections at the top level")
    else:
        raw = {}
    if overrides:
        raw = deep_merge(raw, overrides)
    return resolve_params(raw, str(path))


def preset_params(preset: str = "smoke", **overrides) -> Params:
    """Convenience for tests and benchmarks."""
    return resolve_params({"preset": preset, **overrides}, f"preset {preset}")
