"""Request and response bodies of the counterfactual API (issue 8), as strict pydantic models.

Requests reject unknown fields, wrong types (no "45" for a number) and out-of-range values; every
error names the field it is about (`field_errors`). Attribute values are the label strings of
`cxrcf.attributes.VOCAB`; age is in years (0-120).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cxrcf.attributes import AGE_MAX, AGE_MIN, ATTRIBUTES, VOCAB
from cxrcf.config import IMAGE_ID_CAP, INTERVENTIONS_CAP, TU

Sex = Literal["male", "female"]
Race = Literal["white", "asian", "black"]
Finding = Literal["no_finding", "pleural_effusion"]
Age = Annotated[float, Field(ge=AGE_MIN, le=AGE_MAX, allow_inf_nan=False, description="years")]

# Hard caps in the schema itself (cxrcf/config.py), so that pydantic refuses an absurd request before
# building it; the run-time limits (serve.max_interventions, serve.max_image_id_chars) may be lower
# and are checked after parsing.

# the API's value names must be exactly the vocabulary the models were trained with
assert VOCAB == {"sex": Sex.__args__, "race": Race.__args__, "finding": Finding.__args__}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parents(_Request):
    """The four parents of an image (SCIENCE.md section 2)."""

    sex: Sex
    race: Race
    age: Age
    finding: Finding


class Intervention(_Request):
    """do(...): the attributes to set and their new values; at least one."""

    sex: Sex | None = None
    race: Race | None = None
    age: Age | None = None
    finding: Finding | None = None

    @model_validator(mode="after")
    def _not_empty(self):
        if not self.values():
            raise ValueError(f"empty intervention; set at least one of {', '.join(ATTRIBUTES)}")
        return self

    def values(self) -> dict[str, str | float]:
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}


class CounterfactualRequest(_Request):
    image: str | None = Field(None, description="base64 PNG, 1-channel grayscale (8 or 16 bit), any size")
    image_id: str | None = Field(None, min_length=1, max_length=IMAGE_ID_CAP,
                                 description="an id of the served dataset's metadata.csv")
    parents: Parents | None = Field(
        None, description="factual parents; inferred by the evaluation predictor when omitted "
                          "(for image_id: taken from the dataset's labels)")
    interventions: list[Intervention] = Field(min_length=1, max_length=INTERVENTIONS_CAP)
    t_u: TU | None = Field(None, description="pixel-noise temperature; omitted: the server's serve.t_u (1.0)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seeds the abduction noise of the batch")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "image": "<base64 PNG>",
        "parents": {"sex": "male", "race": "white", "age": 61.0, "finding": "no_finding"},
        "interventions": [{"sex": "female"}, {"age": 80.0}],
        "t_u": 1.0,
        "seed": 0,
    }]})

    @field_validator("interventions", mode="before")
    @classmethod
    def _not_too_many(cls, value):
        # before item validation: pydantic's max_length is checked only after building every item
        if isinstance(value, list) and len(value) > INTERVENTIONS_CAP:
            raise ValueError(f"{len(value)} given; at most {INTERVENTIONS_CAP} per request (the API's hard cap)")
        return value

    @model_validator(mode="after")
    def _one_image(self):
        if (self.image is None) == (self.image_id is None):
            # model-level checks name their field as "<field>: ..."; field_errors moves it into the location
            raise ValueError("image: give exactly one of image (base64 PNG) or image_id")
        return self


# ------------------------------------------------------------------------------------ responses
class Probabilities(_Response):
    """The evaluation predictor's beliefs; class probabilities per attribute, age in years."""

    sex: dict[str, float]
    race: dict[str, float]
    finding: dict[str, float]
    age: float


class Factual(_Response):
    image_id: str | None = None
    height: int
    width: int
    parents: Parents
    parents_inferred: bool = Field(description="true when the evaluation predictor supplied the parents")
    probabilities: Probabilities


class Counterfactual(_Response):
    intervention: dict[str, str | float]
    parents: Parents = Field(description="counterfactual parents from the SCM (age updates finding)")
    image: str = Field(description="base64 PNG, the input's size")
    probabilities: Probabilities
    drift: Probabilities = Field(description="counterfactual minus factual, per class and age")


class ModelRef(_Response):
    name: str
    version: str
    alias: str | None = None
    mode: str | None = None
    arm: Literal["champion", "candidate"] = Field("champion", description="which side of the canary answered")
    batch_size: int = Field(description="requests in the batch that served this one")


class CounterfactualResponse(_Response):
    factual: Factual
    counterfactuals: list[Counterfactual]
    model: ModelRef
    t_u: float
    seed: int


class BatchStats(_Response):
    batches: int
    requests: int
    mean_batch_size: float
    max_batch_size: int
    batch_wait_timeout_s: float


class ArmStats(_Response):
    requests: int = Field(description="answered (champion, candidate) or mirrored (shadow) requests")
    version: str | None = Field(description="the version that last served this arm")
    effectiveness: dict[str, float] = Field(
        description="mean probability the evaluation predictor gives each intervened value on the "
                    "counterfactual (sex, race, finding); age_error_years: mean |predicted - intervened age|")


class CanaryInfo(_Response):
    """The canary as this replica runs it (serve.canary)."""

    alias: str
    weight: float = Field(description="share of requests the candidate answers")
    shadow: float = Field(description="share of the champion's requests mirrored to the candidate")
    candidate_version: str | None = None
    candidate_state: AliasState | None = None
    candidate_error: str | None = Field(None, description="why there is no candidate (all traffic to the champion)")
    shadow_pending: int
    shadow_skipped: int = Field(description="mirrors skipped because serve.canary.max_shadow_pending were running")
    shadow_failed: int
    arms: dict[str, ArmStats]


class ModelInfo(_Response):
    name: str
    version: str
    alias: str | None = None
    mode: str | None = None
    uri: str
    resolution: int
    metrics: dict[str, Any]
    device: str
    loaded_at: str
    reloads: int
    replica: str = Field(description="the Serve replica that answered")
    stats: BatchStats
    alias_state: AliasState
    canary: CanaryInfo | None = Field(None, description="present while serve.canary sends traffic to a candidate")


class Health(_Response):
    """Liveness: the replica process answers (says nothing about the registry)."""

    status: Literal["ok"]
    model: str
    version: str


class AliasState(_Response):
    """What the replica knows about the alias it follows."""

    state: Literal["current", "stale", "withdrawn", "pinned"] = Field(
        description="current: checked within serve stale_after_s; stale: the registry has not answered "
                    "since; withdrawn: the alias was removed (requests answer 503); pinned: a fixed version")
    last_check_age_s: float | None = Field(description="seconds since the registry last answered")
    registry_reachable: bool
    source: Literal["registry", "last-known-good"] = Field(
        description="where the served version was loaded from")
    failed_version: str | None = Field(None, description="a newer version that failed to load")
    failures: int = 0
    retry_in_s: float | None = Field(None, description="when that version is tried again (exponential backoff)")
    last_error: str | None = None


class Ready(_Response):
    """Readiness: whether this replica should be sent counterfactual requests now, and why not."""

    ready: bool
    reasons: list[str]
    model: str
    version: str
    alias: str | None = None
    alias_state: AliasState
    batch_timeouts: int = Field(description="consecutive batches that missed serve batch_timeout_s")


class FieldError(_Response):
    field: str
    message: str


class ErrorBody(_Response):
    detail: str
    errors: list[FieldError] = []


# --------------------------------------------------------------------------------------- errors
def _message(err: dict) -> str:
    kind = err["type"]
    loc = err.get("loc", ())
    if kind == "extra_forbidden":
        if "interventions" in loc or "parents" in loc:
            return f"unknown attribute; expected one of {', '.join(ATTRIBUTES)}"
        return "unknown field"
    if kind == "literal_error":
        expected = VOCAB.get(str(loc[-1]) if loc else "", ())
        return f"unknown value {err.get('input')!r}; expected one of {', '.join(expected)}" if expected \
            else err["msg"]
    if kind == "missing":
        return "required"
    if kind == "json_invalid":
        return f"not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def field_errors(errors: list[dict]) -> list[FieldError]:
    """Pydantic/FastAPI error dicts -> [FieldError]; the leading `body` of FastAPI locations is dropped."""
    out = []
    for err in errors:
        loc = list(err.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        message = _message(err)
        if err["type"] == "json_invalid":
            loc = []
        elif err["type"] == "value_error":
            named, sep, rest = message.partition(": ")
            if sep and named.isidentifier():
                loc, message = loc + [named], rest
        out.append(FieldError(field=".".join(str(p) for p in loc) or "body", message=message))
    return out


def error_body(errors: list[FieldError]) -> dict:
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return ErrorBody(detail=detail, errors=errors).model_dump()


# ----------------------------------------------------------------------------- building replies
def probabilities(p: dict[str, Any]) -> Probabilities:
    """A probability row (`cxrcf.batch.probability_rows`: sex/finding P(class 1), race by label or as the
    3 probabilities in VOCAB order, age in years) as the API's per-class probabilities."""
    race = p["race"]
    return Probabilities(
        sex=dict(zip(VOCAB["sex"], (1.0 - p["sex"], p["sex"]))),
        race=dict(race) if isinstance(race, dict) else dict(zip(VOCAB["race"], race, strict=True)),
        finding=dict(zip(VOCAB["finding"], (1.0 - p["finding"], p["finding"]))),
        age=p["age"],
    )


def drift(factual: Probabilities, counterfactual: Probabilities) -> Probabilities:
    def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in a}

    return Probabilities(sex=diff(factual.sex, counterfactual.sex), race=diff(factual.race, counterfactual.race),
                         finding=diff(factual.finding, counterfactual.finding),
                         age=counterfactual.age - factual.age)


def parents_from_codes(codes: dict[str, float]) -> Parents:
    from cxrcf.attributes import decode

    return Parents(**{a: decode(a, codes[a]) for a in ATTRIBUTES})
