"""SynthCXR: a procedural chest-radiograph-like simulator with a known SCM (SCIENCE.md section 2).

Mechanisms, each driven by recorded exogenous noise so that TRUE counterfactuals can be rendered:
- sex = [u_sex < p_female]; race = Categorical(race_probs) by inverse CDF of u_race;
- age = 18 + 77 * sigmoid(0.3 + 0.85 * z_age) years (rounded to 0.01 y);
- finding = argmax(0 + g0, slope * age_model + bias + g1), g0 and g1 recorded Gumbel draws;
- image = render(sex, race, age, finding, anatomy noise): thorax, lungs, heart, ribs, diaphragm,
  costophrenic angles; effusion = basal opacity with a meniscus whose size comes from z_eff only.

Every recorded float is rounded to the decimals it is written with, and rendering uses the rounded
values, so a record read back from the CSVs renders exactly the stored image. Per-image texture and
pixel noise come from a counter-based hash of a per-image integer seed, so any subset of images can
be re-rendered alone, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cxrcf.attributes import AGE_MAX, AGE_MIN, VOCAB, age_to_model, encode
from cxrcf.errors import CxrcfError

GENERATOR_VERSION = 1
FLOAT_DECIMALS = 6
AGE_DECIMALS = 2

# Standard-normal anatomy / appearance noise, one value per image each.
NORMAL_NOISE = (
    "z_age", "z_shift", "z_thorax", "z_fat", "z_lung_sep", "z_lung_w", "z_lung_top",
    "z_dia_r", "z_dia_l", "z_dome", "z_heart_size", "z_heart_x", "z_heart_y",
    "z_rib_spacing", "z_bone", "z_breast", "z_breast_y", "z_shoulder", "z_knob", "z_hilum",
    "z_eff", "z_eff_other", "z_haze", "z_texture", "z_density", "z_gain", "z_offset",
)
UNIFORM_NOISE = ("u_sex", "u_race", "u_side", "u_rib_phase")
GUMBEL_NOISE = ("g0", "g1")
SEED_NOISE = ("texture_seed", "pixel_seed")
MECHANISM_COLUMNS = ("finding_age_slope", "finding_bias")
EXOGENOUS_COLUMNS = NORMAL_NOISE + UNIFORM_NOISE + GUMBEL_NOISE + SEED_NOISE + MECHANISM_COLUMNS

# Race-linked appearance: lung texture contrast and soft-tissue density (small, overlapping).
RACE_TEXTURE = np.array([1.0, 1.3, 0.75], dtype=np.float32)
RACE_DENSITY = np.array([0.0, 0.5, 1.0], dtype=np.float32)

CHUNK_PIXELS = 1 << 18  # pixels rendered at once: float32 temporaries of ~1 MB stay in cache


# ------------------------------------------------------------------------------------ the SCM
def age_mechanism(z_age):
    return np.round(18.0 + 77.0 / (1.0 + np.exp(-(0.3 + 0.85 * np.asarray(z_age, dtype=np.float64)))),
                    AGE_DECIMALS)


def finding_mechanism(age, g0, g1, slope, bias):
    """Gumbel-max over logits (0, slope * age_model + bias)."""
    logit = np.asarray(slope, dtype=np.float64) * age_to_model(np.asarray(age, dtype=np.float64)) + bias
    return (logit + np.asarray(g1, dtype=np.float64) > np.asarray(g0, dtype=np.float64)).astype(np.int64)


def sample_exogenous(n: int, seed: int, cfg) -> dict[str, np.ndarray]:
    """All exogenous noise of n images, drawn in a fixed order and rounded as it is stored."""
    rng = np.random.default_rng(seed)
    exo: dict[str, np.ndarray] = {}
    for name in NORMAL_NOISE:
        exo[name] = np.round(rng.standard_normal(n), FLOAT_DECIMALS)
    for name in UNIFORM_NOISE:
        exo[name] = np.round(rng.uniform(1e-6, 1 - 1e-6, n), FLOAT_DECIMALS)
    for name in GUMBEL_NOISE:
        exo[name] = np.round(-np.log(-np.log(rng.uniform(1e-9, 1 - 1e-9, n))), FLOAT_DECIMALS)
    for name in SEED_NOISE:
        exo[name] = rng.integers(0, 2**31 - 1, n, dtype=np.int64)
    exo["finding_age_slope"] = np.full(n, round(float(cfg.finding_age_slope), FLOAT_DECIMALS))
    exo["finding_bias"] = np.full(n, round(float(cfg.finding_bias), FLOAT_DECIMALS))
    return exo


def attributes_from_noise(exo: Mapping[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    sex = (np.asarray(exo["u_sex"]) < cfg.p_female).astype(np.int64)
    cdf = np.cumsum(np.asarray(cfg.race_probs, dtype=np.float64))
    race = np.minimum(np.searchsorted(cdf, np.asarray(exo["u_race"]), side="right"), 2).astype(np.int64)
    age = age_mechanism(exo["z_age"])
    finding = finding_mechanism(age, exo["g0"], exo["g1"], exo["finding_age_slope"], exo["finding_bias"])
    return {"sex": sex, "race": race, "age": age, "finding": finding}


# ------------------------------------------------------------------------------ noise fields
def _hash_uniform(seed, a, b):
    """Counter-based hash (murmur3 finaliser) of (seed, a, b) -> uniform [0, 1) float32."""
    h = (np.asarray(seed, dtype=np.uint32) * np.uint32(0x9E3779B1)
         + np.asarray(a, dtype=np.uint32) * np.uint32(0x85EBCA77)
         + np.asarray(b, dtype=np.uint32) * np.uint32(0xC2B2AE3D))
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _value_noise(seeds, res: int, cells: int, salt: int):
    """Smooth per-image noise in [-0.5, 0.5]: a cells x cells random lattice bilinearly interpolated.

    Defined on the continuous [-1, 1] square, so it is the same field at every resolution.
    """
    g = cells + 1
    ii, jj = np.meshgrid(np.arange(g, dtype=np.uint32), np.arange(g, dtype=np.uint32), indexing="ij")
    lattice = _hash_uniform(seeds[:, None, None], ii[None] + np.uint32(salt), jj[None]) - 0.5
    pos = (np.arange(res, dtype=np.float64) + 0.5) / res * cells
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    w = (pos - i0).astype(np.float32)
    w = w * w * (3 - 2 * w)
    rows = lattice[:, i0, :] * (1 - w)[None, :, None] + lattice[:, i0 + 1, :] * w[None, :, None]
    return rows[:, :, i0] * (1 - w)[None, None, :] + rows[:, :, i0 + 1] * w[None, None, :]


def _pixel_noise(seeds, res: int):
    """Per-pixel grain with unit variance (triangular: the sum of two 12-bit uniforms from one hash)."""
    ii, jj = np.meshgrid(np.arange(res, dtype=np.uint32), np.arange(res, dtype=np.uint32), indexing="ij")
    u = _hash_uniform(seeds[:, None, None], ii, jj) * np.float32(4096.0)
    hi = np.floor(u)
    lo = (u - hi) * np.float32(4096.0)
    return (hi + lo) * np.float32(1.0 / 4096.0 * math.sqrt(6.0)) - np.float32(math.sqrt(6.0))


# --------------------------------------------------------------------------------- rendering
def _smooth(d, width):
    """Smooth step from 0 (d <= -width/2) to 1 (d >= width/2)."""
    t = d * (np.float32(1.0) / width)
    t += np.float32(0.5)
    np.clip(t, 0.0, 1.0, out=t)
    r = t * t
    t *= np.float32(-2.0)
    t += np.float32(3.0)
    r *= t
    return r


def _col(v):
    return np.asarray(v, dtype=np.float32)[:, None, None]


def render(attrs: Mapping[str, np.ndarray], exo: Mapping[str, np.ndarray], resolution: int) -> np.ndarray:
    """uint8 images (N, R, R): a deterministic function of the four attributes and the noise."""
    n = len(np.asarray(attrs["sex"]))
    out = np.empty((n, resolution, resolution), dtype=np.uint8)
    chunk = max(1, CHUNK_PIXELS // (resolution * resolution))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        out[sl] = _render_chunk({k: np.asarray(v)[sl] for k, v in attrs.items()},
                                {k: np.asarray(exo[k])[sl] for k in EXOGENOUS_COLUMNS if k in exo}, resolution)
    return out


EVIDENCE_UNITS = {
    "eff_right": "fraction of the right lung's height (image left) filled by effusion",
    "eff_left": "fraction of the left lung's height (image right) filled by effusion",
    "eff_max": "fraction of lung height, the larger of the two sides",
    "breast_amp": "attenuation units (pre-exposure intensity; the image is offset + ~1.75 * A)",
    "shoulder_amp": "attenuation units",
    "texture_amp": "attenuation units of lung texture contrast",
    "density": "attenuation units of soft tissue",
    "haze": "attenuation units of basal haze (noise only)",
    "bone": "relative bone density (1 = average)",
    "hilum_amp": "attenuation units of the hila",
}
EVIDENCE_COLUMNS = tuple(EVIDENCE_UNITS)
# Which evidence carries each attribute: what an intervention on another attribute must leave alone.
EVIDENCE_OF = {
    "finding": ("eff_max",), "sex": ("breast_amp", "shoulder_amp"),
    "race": ("texture_amp", "density"), "age": ("bone", "hilum_amp"),
}


def _scalars(a, e) -> dict:
    """The per-image scalars the renderer draws from, as (N, 1, 1) float32 arrays.

    One computation shared by `_render_chunk` and `evidence`, so the recorded evidence is exactly
    what was painted.
    """
    f32 = np.float32
    sex = _col(a["sex"])
    race = np.asarray(a["race"], dtype=np.int64)
    age = _col(a["age"])
    finding = _col(a["finding"])
    z = {k: _col(e[k]) for k in NORMAL_NOISE}
    age_n = (age - f32(55.0)) / f32(40.0)  # about -1..1 over the adult range
    density = f32(0.33) + f32(0.025) * RACE_DENSITY[race][:, None, None] + f32(0.02) * z["z_density"]
    # Shoulder girdle soft tissue, broader in men on average.
    shoulder_amp = np.maximum(f32(0.0), f32(0.05) + f32(0.035) * (1 - sex) + f32(0.02) * z["z_shoulder"])
    haze = f32(0.025) / (f32(1.0) + np.exp(-z["z_haze"]))  # basal haze present with or without effusion
    bone = f32(1.0) + f32(0.08) * z["z_bone"] - f32(0.05) * age_n  # bone density falls slowly with age

    eff_main = f32(0.6) / (f32(1.0) + np.exp(-(f32(1.4) * z["z_eff"] + f32(0.2))))
    eff_main = eff_main * eff_main * finding  # fraction of lung height filled; continuous, often tiny
    eff_other = f32(0.45) / (f32(1.0) + np.exp(-(f32(1.4) * z["z_eff_other"] - f32(0.4))))
    eff_other = eff_other * eff_other * finding
    u_side = _col(e["u_side"])
    # Right (image left) alone, left alone, or both sides. Known quirk kept for the pinned images:
    # with u_side >= 0.8 both sides get eff_other and eff_main is unused.
    eff_right = np.where(u_side < 0.5, eff_main, np.where(u_side < 0.8, 0, eff_other))
    eff_left = np.where(u_side < 0.5, 0, np.where(u_side < 0.8, eff_main, eff_other))
    # Lung texture: vessels and parenchyma, contrast linked (weakly) to race.
    tex_amp = f32(0.05) * RACE_TEXTURE[race][:, None, None] * np.exp(f32(0.2) * z["z_texture"])
    hil_amp = np.maximum(f32(0.0), f32(0.05) + f32(0.012) * age_n + f32(0.012) * z["z_hilum"])
    # Breast shadows: soft density over the mid-lower zones, mostly in women.
    breast_amp = f32(0.09) * np.maximum(f32(0.0), f32(0.15) + f32(0.55) * sex + f32(0.3) * z["z_breast"])
    return {"z": z, "age_n": age_n, "density": density, "shoulder_amp": shoulder_amp, "haze": haze,
            "bone": bone, "eff_right": eff_right, "eff_left": eff_left, "texture_amp": tex_amp,
            "hilum_amp": hil_amp, "breast_amp": breast_amp}


def evidence(attrs: Mapping[str, np.ndarray], exo: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image evidence the renderer paints, in the simulator's units (EVIDENCE_UNITS), float64 (N,)."""
    e = {k: np.asarray(exo[k]) for k in NORMAL_NOISE + ("u_side",)}
    sc = _scalars({k: np.asarray(attrs[k]) for k in ("sex", "race", "age", "finding")}, e)
    out = {k: sc[k].reshape(-1).astype(np.float64) for k in EVIDENCE_COLUMNS if k != "eff_max"}
    out["eff_max"] = np.maximum(out["eff_right"], out["eff_left"])
    return {k: out[k] for k in EVIDENCE_COLUMNS}


def _record_columns(frame, what: str) -> dict[str, np.ndarray]:
    """The attribute and exogenous columns of metadata rows a true counterfactual needs, as arrays."""
    needed = EXOGENOUS_COLUMNS + ("sex", "race", "age", "finding")
    missing = [k for k in needed if not _has(frame, k)]
    if missing:
        raise CxrcfError(f"{what}: missing column(s) {', '.join(missing)} "
                         "(join metadata.csv with exogenous.csv of a SynthCXR dataset)")
    return {k: np.asarray(frame[k]) for k in needed}


def counterfactual_evidence(frame, do_values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evidence of the TRUE counterfactuals of metadata rows joined with their exogenous noise."""
    cols = _record_columns(frame, "counterfactual evidence")
    return evidence(counterfactual_attributes(cols, do_values), cols)


# Noise whose effect the renderer multiplies by the attribute (effusion size and side: `_scalars`), so an
# image with the attribute at 0 holds no trace of it. No model can recover it from such an image: the
# true counterfactual that adds the attribute is not identifiable from x, and the best a model can do is
# draw that noise from its prior (SCIENCE.md section 6, "better than doing nothing").
HIDDEN_WHEN_ABSENT = {"finding": ("z_eff", "z_eff_other", "u_side")}


def redraw_hidden_noise(frame, attr: str, seed: int):
    """A copy of metadata+exogenous rows whose noise hidden by `attr` = 0 is drawn afresh from its prior,
    in those rows only (rounded as stored): the ideal model's counterfactual of adding `attr`."""
    hidden = HIDDEN_WHEN_ABSENT.get(attr, ())
    out = frame.copy()
    absent = np.flatnonzero(_codes(np.asarray(frame[attr]), attr) == 0)
    rng = np.random.default_rng(seed)
    for name in hidden:
        draw = rng.uniform(1e-6, 1 - 1e-6, len(absent)) if name in UNIFORM_NOISE else rng.standard_normal(len(absent))
        column = out[name].to_numpy(dtype=np.float64, copy=True)
        column[absent] = np.round(draw, FLOAT_DECIMALS)
        out[name] = column
    return out


# Ambiguity of each attribute's own evidence, from the simulator's noise alone (never a predictor).
AMBIGUOUS_BELOW = 0.9  # sex, race: the simulator's posterior of the factual class under equal priors
SMALL_EFFUSION = 0.05  # finding: an effusion filling less than 5% of lung height


def ambiguity_strata(attrs: Mapping[str, np.ndarray], exo: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Per attribute j in (sex, race, finding): `p`, the simulator's own posterior of the factual
    class given the evidence it painted for j (equal priors; for finding 1 when absent, else the
    effusion's share of lung height), and `stratum`, "ambiguous" or "clear".

    sex: breast amplitude 0.09 * (0.15 + 0.55 sex + 0.3 z_breast) and shoulder amplitude
    0.05 + 0.035 (1 - sex) + 0.02 z_shoulder are Gaussian in their noise with class-shifted means,
    so the log-likelihood ratio is linear in z (the clipping at 0 is ignored). race: log texture
    amplitude (sd 0.2) and soft-tissue density (sd 0.02) per class, three-way softmax. finding: no
    fluid is painted without an effusion, so absent is clear; a present effusion smaller than
    SMALL_EFFUSION of lung height is ambiguous.
    """
    sex = np.asarray(attrs["sex"], dtype=np.int64)
    race = np.asarray(attrs["race"], dtype=np.int64)
    z_b, z_s = np.asarray(exo["z_breast"], float), np.asarray(exo["z_shoulder"], float)
    d_b, d_s = 0.55 / 0.3, 0.035 / 0.02
    sign = np.where(sex == 1, 1.0, -1.0)
    llr = sign * (d_b * z_b - d_s * z_s) + 0.5 * (d_b**2 + d_s**2)
    p_sex = 1.0 / (1.0 + np.exp(-llr))
    log_rt = np.log(RACE_TEXTURE.astype(np.float64))
    rd = RACE_DENSITY.astype(np.float64)
    zt = np.asarray(exo["z_texture"], float)[:, None] + (log_rt[race][:, None] - log_rt[None, :]) / 0.2
    zd = np.asarray(exo["z_density"], float)[:, None] + 0.025 * (rd[race][:, None] - rd[None, :]) / 0.02
    ll = -0.5 * (zt**2 + zd**2)
    ll -= ll.max(axis=1, keepdims=True)
    post = np.exp(ll) / np.exp(ll).sum(axis=1, keepdims=True)
    p_race = post[np.arange(len(race)), race]
    eff = evidence(attrs, exo)["eff_max"]
    finding = np.asarray(attrs["finding"], dtype=np.int64)
    p_finding = np.where(finding == 1, eff, 1.0)
    amb = {"sex": p_sex < AMBIGUOUS_BELOW, "race": p_race < AMBIGUOUS_BELOW,
           "finding": (finding == 1) & (eff < SMALL_EFFUSION)}
    ps = {"sex": p_sex, "race": p_race, "finding": p_finding}
    return {j: {"p": ps[j], "stratum": np.where(amb[j], "ambiguous", "clear")} for j in ("sex", "race", "finding")}


def _render_chunk(a, e, res: int) -> np.ndarray:
    f32 = np.float32
    c = ((np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1).astype(f32)
    X = c[None, None, :]
    Y = c[None, :, None]
    ew = f32(0.035 + 1.5 / res)  # edge softness: anatomical blur plus a pixel of antialiasing

    sc = _scalars(a, e)
    z, age_n = sc["z"], sc["age_n"]

    cx = f32(0.025) * z["z_shift"]
    dx = X - cx
    adx = np.abs(dx)
    tw = f32(0.74) + f32(0.035) * z["z_thorax"]  # rib cage half-width

    # Soft tissue of the body: neck above the shoulders, chest wall around the rib cage.
    bw = tw + f32(0.13) + f32(0.035) * z["z_fat"]
    # Rounded shoulders: the half-width grows from the neck like a quarter ellipse.
    neck = f32(0.24) + (bw - f32(0.24)) * np.sqrt(np.clip((Y + f32(0.95)) / f32(0.38), 0.0, 1.0))
    body = _smooth(neck - adx, ew) * _smooth(f32(0.97) - Y, ew)
    A = sc["density"] * body

    # Shoulder girdle soft tissue.
    shoulder_amp = sc["shoulder_amp"]
    shoulder = _smooth(adx - (tw - f32(0.1)), f32(0.2)) * _smooth(f32(-0.45) - Y, f32(0.25)) * body
    A = A + shoulder_amp * shoulder

    # Lungs: rounded apices, widening downwards, floors formed by the diaphragm domes.
    lsep = f32(0.37) * tw / f32(0.74) + f32(0.015) * z["z_lung_sep"]
    lw = f32(0.29) * tw / f32(0.74) + f32(0.015) * z["z_lung_w"]
    ltop = f32(-0.72) + f32(0.03) * z["z_lung_top"]
    dome_depth = f32(0.13) + f32(0.025) * z["z_dome"]
    haze, bone = sc["haze"], sc["bone"]
    eff_by_side = {-1: sc["eff_right"], 1: sc["eff_left"]}

    lungs = np.zeros_like(A)
    effusion = np.zeros_like(A)
    for s, dia_key, dia_off in ((-1, "z_dia_r", -0.035), (1, "z_dia_l", 0.0)):
        lx = cx + s * lsep
        u = (X - lx) / lw * s  # lateral is positive on both sides
        dh = f32(0.50 + dia_off) + f32(0.035) * z[dia_key]  # dome apex height
        height = dh + dome_depth - ltop
        v = np.clip((Y - ltop) / height, 0.0, 1.0)
        profile = np.sqrt(np.clip(v * f32(2.4), 0.0, 1.0)) * (f32(1.0) - f32(0.1) * (u < 0))
        dome = dh + dome_depth * np.clip(u, -1.0, 1.0) ** 2 * (u > 0) + f32(0.3) * dome_depth * u * u * (u <= 0)
        side_mask = _smooth((profile - np.abs(u)) * lw, ew) * _smooth(Y - ltop, ew)
        lungs = lungs + side_mask * _smooth(dome - Y, ew)

        # Effusion: fluid from the costophrenic angle upwards, higher laterally (the meniscus),
        # filling the angle and hiding the dome, densest at the base.
        frac = eff_by_side[s]
        base = dh + dome_depth
        level_lat = base - frac * height * f32(1.25) - f32(0.02) * (frac > 0)
        level_med = base - frac * height * f32(0.7)
        uc = np.clip(u, 0.0, 1.0)
        top = level_med + (level_lat - level_med) * uc * uc
        grad = f32(0.02) + f32(0.35) * frac * height
        fluid = _smooth(Y - top, grad + ew) * _smooth(base + f32(0.08) - Y, ew)
        effusion = effusion + side_mask * fluid * (frac > 0)
        haze_mask = _smooth(Y - (dh - f32(0.05)), f32(0.15)) * side_mask
        effusion = effusion + haze * haze_mask / f32(0.22)

    # Mediastinum and heart (to the patient's left, image right) displace the lungs: soft tissue
    # where there would be air, so they hide the lung behind them rather than adding to it.
    med_w = f32(0.085) + f32(0.05) * _smooth(Y, f32(0.6))
    mediastinum = _smooth(med_w - adx, ew) * _smooth(Y + f32(0.75), ew) * _smooth(f32(0.72) - Y, ew)
    hr = (f32(0.35) + f32(0.025) * z["z_heart_size"]) * tw / f32(0.74)
    hx = cx + f32(0.13) + f32(0.025) * z["z_heart_x"]
    hy = f32(0.30) + f32(0.03) * z["z_heart_y"]
    heart_d = ((X - hx) / hr) ** 2 + ((Y - hy) / (hr * f32(0.72))) ** 2
    heart = _smooth(f32(1.0) - heart_d, f32(0.25) + f32(3.0) / res)
    solid = np.maximum(mediastinum, heart)
    lungs = lungs * (f32(1.0) - solid)

    lung_dark = f32(0.24)
    # Lung texture: vessels and parenchyma.
    seeds_tex = np.asarray(e["texture_seed"], dtype=np.int64).astype(np.uint32)
    tex_amp = sc["texture_amp"]
    texture = _value_noise(seeds_tex, res, 10, 0) + f32(0.6) * _value_noise(seeds_tex, res, 21, 1000)
    fluid = np.minimum(effusion, f32(1.0))
    A = A - lung_dark * lungs * (f32(1.0) - f32(0.9) * fluid)
    A = A + tex_amp * texture * lungs * (f32(1.0) - fluid)
    A = A + f32(0.02) * solid + f32(0.05) * bone * _smooth(f32(0.045) - adx, ew) * body

    # Aortic knob and hila: more prominent, with a calcified rim, in older patients (weak).
    knob_d = np.sqrt((X - cx - f32(0.10)) ** 2 + (Y + f32(0.36)) ** 2)
    knob_r = f32(0.06) + f32(0.006) * z["z_knob"] + f32(0.005) * age_n
    calc = f32(0.03) * np.clip(age_n + f32(0.3) * z["z_knob"], 0.0, None)
    A = A + f32(0.07) * _smooth(knob_r - knob_d, ew) + calc * _smooth(f32(0.025) - np.abs(knob_d - knob_r), ew)
    hil_amp = sc["hilum_amp"]
    for s in (-1, 1):
        hd = ((X - cx - s * f32(0.2)) / f32(0.09)) ** 2 + ((Y + f32(0.05)) / f32(0.16)) ** 2
        A = A + hil_amp * _smooth(f32(1.0) - hd, f32(1.0))

    # Ribs (posterior arcs sloping down laterally) and clavicles; contrast follows bone density.
    spacing = f32(0.2) + f32(0.012) * z["z_rib_spacing"]
    phase = _col(e["u_rib_phase"])
    t = (Y - f32(0.5) * adx + f32(0.3) * adx * adx) / spacing + phase
    rib_band = np.clip((np.cos(f32(2 * math.pi) * t) - f32(0.25)) / f32(0.6), 0.0, 1.0)
    cage = _smooth(tw - adx, ew) * _smooth(Y + f32(0.78), ew) * _smooth(f32(0.62) - Y, f32(0.2))
    A = A + f32(0.07) * bone * rib_band * cage
    clav = _smooth(f32(0.035) - np.abs(Y + f32(0.66) - f32(0.22) * adx), ew) * _smooth(tw - adx, ew)
    A = A + f32(0.09) * bone * clav * _smooth(adx - f32(0.07), ew)

    # Breast shadows: soft density over the mid-lower zones with a lower fold.
    breast_amp = sc["breast_amp"]
    by = f32(0.22) + f32(0.035) * z["z_breast_y"]
    for s in (-1, 1):
        bd = ((X - cx - s * tw * f32(0.62)) / f32(0.3)) ** 2 + ((Y - by) / f32(0.22)) ** 2
        A = A + breast_amp * _smooth(f32(1.0) - bd, f32(0.9)) * body

    # Exposure, grain and 8-bit quantisation.
    gain = f32(1.75) * (f32(1.0) + f32(0.05) * z["z_gain"])
    offset = f32(0.03) + f32(0.015) * z["z_offset"]
    grain = _pixel_noise(np.asarray(e["pixel_seed"], dtype=np.int64).astype(np.uint32), res)
    img = offset + gain * A + f32(0.012) * grain
    return np.clip(np.rint(img * f32(255.0)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- counterfactuals
def _codes(values, attr):
    """Labels or codes -> codes (years for age), rejecting anything outside the attribute's range."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OUS":
        return np.array([encode(attr, v) for v in arr.ravel()], dtype=np.float64 if attr == "age" else np.int64)
    if attr == "age":
        out = arr.astype(np.float64)
        bad = ~((out >= AGE_MIN) & (out <= AGE_MAX))
    else:
        out = arr.astype(np.int64)
        bad = (out != arr) | (out < 0) | (out >= len(VOCAB[attr]))
    if bad.any():
        allowed = f"{AGE_MIN:g}-{AGE_MAX:g} years" if attr == "age" else f"codes 0-{len(VOCAB[attr]) - 1}"
        raise CxrcfError(f"do: {attr} = {arr.ravel()[np.flatnonzero(bad)[0]].item()!r} is outside {allowed}")
    return out


def counterfactual_attributes(frame, do_values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parents after the intervention: age recomputes finding from the recorded Gumbel noise."""
    unknown = set(do_values) - {"sex", "race", "age", "finding"}
    if unknown:
        raise CxrcfError(f"do: unknown attribute(s) {sorted(unknown)}; expected sex, race, age, finding")
    n = len(frame["sex"])
    attrs = {k: _codes(frame[k], k) for k in ("sex", "race", "age", "finding")}
    for k, v in do_values.items():
        vals = _codes(np.broadcast_to(np.asarray(v), (n,)), k)
        if k == "age":
            vals = np.round(vals, AGE_DECIMALS)
        attrs[k] = vals
    if "age" in do_values and "finding" not in do_values:
        attrs["finding"] = finding_mechanism(attrs["age"], frame["g0"], frame["g1"],
                                             frame["finding_age_slope"], frame["finding_bias"])
    return attrs


def render_counterfactuals(frame, do_values: Mapping[str, np.ndarray], resolution: int | None = None) -> np.ndarray:
    """TRUE counterfactual images (N, R, R) uint8 of metadata rows joined with their exogenous noise."""
    cols = _record_columns(frame, "counterfactual record")
    res = int(resolution or _resolution_of(frame))
    attrs = counterfactual_attributes(cols, do_values)
    return render(attrs, cols, res)


def render_counterfactual(record: Mapping, do: Mapping[str, object], resolution: int | None = None) -> np.ndarray:
    """TRUE counterfactual of one record (R, R) uint8; `do={}` gives the factual image bit for bit."""
    frame = {k: np.asarray([v]) for k, v in dict(record).items()}
    return render_counterfactuals(frame, {k: np.asarray([v]) for k, v in do.items()}, resolution)[0]


def _has(frame, key) -> bool:
    try:
        return key in frame
    except TypeError:
        return False


def _resolution_of(frame) -> int:
    if _has(frame, "resolution"):
        return int(np.asarray(frame["resolution"]).ravel()[0])
    raise CxrcfError("counterfactual: pass resolution= (the record has no 'resolution' column)")


# ------------------------------------------------------------------------------- dataset files
def _assign_splits(n: int, seed: int, split_cfg) -> np.ndarray:
    """One subject per synthetic image; exact split sizes, order from a seeded permutation."""
    order = np.random.default_rng([seed, 7919]).permutation(n)
    n_train = round(split_cfg.train * n)
    n_val = round(split_cfg.val * n)
    labels = np.empty(n, dtype=object)
    labels[order[:n_train]] = "train"
    labels[order[n_train:n_train + n_val]] = "val"
    labels[order[n_train + n_val:]] = "test"
    return labels


def _build_tables(cfg):
    import pandas as pd

    n = cfg.n_images
    exo = sample_exogenous(n, cfg.seed, cfg)
    attrs = attributes_from_noise(exo, cfg)
    ids = [f"cxr{i:06d}" for i in range(n)]
    meta = pd.DataFrame({
        "id": ids,
        "path": [f"images/{i}.png" for i in ids],
        "subject_id": [f"p{i:06d}" for i in range(n)],
        "sex": [VOCAB["sex"][c] for c in attrs["sex"]],
        "race": [VOCAB["race"][c] for c in attrs["race"]],
        "age": attrs["age"],
        "finding": [VOCAB["finding"][c] for c in attrs["finding"]],
        "split": _assign_splits(n, cfg.seed, cfg.split),
    })
    exo_frame = pd.DataFrame({"id": ids, **{k: exo[k] for k in EXOGENOUS_COLUMNS}})
    return meta, exo_frame, attrs, exo


def format_csv(frame, float_decimals: dict[str, int]) -> str:
    """CSV text with fixed float formatting, so the bytes depend only on the values."""
    out = frame.copy()
    for col, dec in float_decimals.items():
        out[col] = [f"{v:.{dec}f}" for v in out[col].to_numpy(dtype=np.float64)]
    return out.to_csv(index=False, lineterminator="\n")


def evidence_csv(ids, attrs, exo) -> str:
    """evidence.csv text: id plus EVIDENCE_COLUMNS at FLOAT_DECIMALS."""
    import pandas as pd

    frame = pd.DataFrame({"id": list(ids), **evidence(attrs, exo)})
    return format_csv(frame, {k: FLOAT_DECIMALS for k in EVIDENCE_COLUMNS})


def load_evidence(root: str | Path):
    """evidence.csv of a SynthCXR dataset as a DataFrame (id + EVIDENCE_COLUMNS).

    A dataset written before evidence.csv existed gets it recomputed from metadata.csv and
    exogenous.csv (the same numbers, as the renderer's scalars are a function of those).
    """
    import pandas as pd

    from cxrcf.data import load_exogenous, load_metadata

    root = Path(root)
    path = root / "evidence.csv"
    if path.is_file():
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as err:
            raise CxrcfError(f"{path}: unreadable ({err})") from None
        missing = [c for c in ("id",) + EVIDENCE_COLUMNS if c not in frame.columns]
        if missing:
            raise CxrcfError(f"{path}: missing column(s) {', '.join(missing)}")
        for col in EVIDENCE_COLUMNS:
            bad = np.flatnonzero(~np.isfinite(pd.to_numeric(frame[col], errors="coerce").to_numpy(float)))
            if len(bad):
                raise CxrcfError(f"{path}: row {bad[0] + 2}: column {col} = {frame[col].iloc[bad[0]]!r} "
                                 "is not a number")
        return frame
    exo = load_exogenous(root)
    if exo is None:
        raise CxrcfError(f"{root}: no evidence.csv and no exogenous.csv (evidence exists for SynthCXR only)")
    meta = load_metadata(root).merge(exo, on="id", how="inner", validate="one_to_one")
    attrs = {k: _codes(meta[k].to_numpy(), k) for k in ("sex", "race", "age", "finding")}
    return pd.DataFrame({"id": meta["id"].to_numpy(), **evidence(attrs, {k: meta[k].to_numpy() for k in meta})})


def png_bytes(img: np.ndarray) -> bytes:
    """8-bit grayscale PNG with fixed settings (filter None, zlib level 6, no ancillary chunks).

    Written directly rather than through PIL: identical pixels give identical bytes, and it is
    several times faster for the many small images of a dataset.
    """
    import struct
    import zlib

    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape
    raw = np.zeros((h, w + 1), dtype=np.uint8)
    raw[:, 1:] = img

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def write_png(img: np.ndarray, path) -> None:
    with open(path, "wb") as f:
        f.write(png_bytes(img))


def _write_pngs(images: np.ndarray, paths: list[str]) -> None:
    for img, path in zip(images, paths):
        write_png(img, path)


def _render_and_write(job) -> int:
    attrs, exo, res, paths = job
    _write_pngs(render(attrs, exo, res), paths)
    return len(paths)


def _dataset_card(meta, cfg, counts: dict) -> str:
    bands = [(18, 40), (40, 60), (60, 75), (75, 96)]
    rate_lines = []
    for lo, hi in bands:
        sel = meta[(meta.age >= lo) & (meta.age < hi)]
        rate = (sel.finding == "pleural_effusion").mean() if len(sel) else float("nan")
        rate_lines.append(f"| {lo}-{hi} | {len(sel)} | {rate:.3f} |")
    group_lines = [f"| {k.replace('/', ' | ')} | {v} |" for k, v in counts["sex_race_finding"].items()]
    return "\n".join([
        "# SynthCXR dataset card",
        "",
        ("Procedural chest-radiograph-like images with a known structural causal model "
         "(sex, race, age roots; age -> finding by Gumbel-max; image from all four plus recorded "
         "anatomy noise). `exogenous.csv` holds every noise variable, so the true counterfactual of "
         "any image can be rendered with `cxrcf.synth.render_counterfactual`. `evidence.csv` holds what the "
         "renderer painted in its own units (effusion fraction of lung height per side, breast, "
         "shoulder, texture, soft-tissue and hilum amplitudes, bone density; see "
         "`cxrcf.synth.EVIDENCE_UNITS`)."),
        "",
        f"- generator version: {GENERATOR_VERSION}",
        f"- seed: {cfg.seed}",
        f"- images: {counts['total']} at {cfg.resolution}x{cfg.resolution}, 8-bit grayscale PNG",
        f"- splits: {', '.join(f'{k} {v}' for k, v in counts['split'].items())}",
        "",
        "## Mechanisms",
        "",
        f"- sex: female with probability {cfg.p_female}",
        f"- race (white, asian, black): probabilities {tuple(cfg.race_probs)}",
        "- age: 18 + 77 * sigmoid(0.3 + 0.85 * z_age) years",
        f"- finding: argmax(g0, {cfg.finding_age_slope} * (age/100*2-1) + ({cfg.finding_bias}) + g1)",
        ("- image: effusion size depends on z_eff only (fraction of lung height, continuous, often tiny); "
         "sex changes breast and shoulder soft tissue; age weakly changes bone density, aortic knob "
         "and hila; race weakly changes lung texture contrast and soft-tissue density."),
        "",
        "## Counts by subgroup",
        "",
        "| sex | race | finding | images |",
        "|---|---|---|---|",
        *group_lines,
        "",
        "## Finding rate by age band",
        "",
        "| age | images | pleural effusion rate |",
        "|---|---|---|",
        *rate_lines,
        "",
    ])


def generate_dataset(root: str | Path, cfg, workers: int | None = None, progress: bool | None = None):
    """Write a SynthCXR dataset to `root` atomically and return its metadata DataFrame.

    `workers` processes render and encode (default: 2 for 4096 images or more); the bytes written do
    not depend on it. `progress` prints a line per 1024 images (default: for 5000 images or more).
    """
    from cxrcf.data import check_replaceable, subgroup_counts
    from cxrcf.fileio import atomic_path

    root = check_replaceable(root)
    t0 = time.perf_counter()
    meta, exo_frame, attrs, exo = _build_tables(cfg)
    n, res = cfg.n_images, cfg.resolution
    if progress is None:
        progress = n >= 5000
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if n >= 4096 else 1

    with atomic_path(root) as tmp:
        (tmp / "images").mkdir(parents=True)
        step = 1024
        jobs = []
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            jobs.append(({k: v[sl] for k, v in attrs.items()}, {k: v[sl] for k, v in exo.items()}, res,
                         [str(tmp / p) for p in meta["path"].iloc[sl]]))
        done = 0
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the caller may hold threads (Ray, torch) that fork would copy badly.
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for k in pool.map(_render_and_write, jobs):
                    done += k
                    _progress(progress, done, n, t0)
        else:
            for job in jobs:
                done += _render_and_write(job)
                _progress(progress, done, n, t0)

        (tmp / "metadata.csv").write_text(format_csv(meta, {"age": AGE_DECIMALS}))
        exo_floats = {k: FLOAT_DECIMALS for k in EXOGENOUS_COLUMNS if k not in SEED_NOISE}
        (tmp / "exogenous.csv").write_text(format_csv(exo_frame, exo_floats))
        (tmp / "evidence.csv").write_text(evidence_csv(meta["id"], attrs, exo))
        counts = subgroup_counts(meta)
        info = {
            "name": "SynthCXR",
            "generator_version": GENERATOR_VERSION,
            "seed": cfg.seed,
            "n_images": n,
            "resolution": res,
            "synth_config": cfg.model_dump(mode="json"),
            "counts": counts,
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / "dataset_card.md").write_text(_dataset_card(meta, cfg, counts))
    if progress:
        print(f"synth: wrote {n} images at {res}x{res} to {root} in {time.perf_counter() - t0:.1f}s", flush=True)
    return meta


def _progress(enabled: bool, done: int, n: int, t0: float) -> None:
    if enabled:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f"synth: {done}/{n} images ({rate:.0f}/s)", file=sys.stdout, flush=True)
