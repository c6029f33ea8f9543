"""SynthCXR: the SCM's dependence structure, true counterfactuals, determinism, ambiguity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrcf import synth
from cxrcf.config import preset_params
from cxrcf.data import split_frame, to_model_images
from cxrcf.errors import CxrcfError


def _cfg(**kw):
    return preset_params("smoke").data.synth.model_copy(update=kw)


def _population(n, seed=0, **kw):
    cfg = _cfg(**kw)
    exo = synth.sample_exogenous(n, seed, cfg)
    return cfg, exo, synth.attributes_from_noise(exo, cfg)


def test_scm_dependence_structure():
    cfg, exo, a = _population(40000, seed=3)
    age, f = a["age"], a["finding"]
    assert 18 <= age.min() and age.max() <= 95
    lo, hi = np.quantile(age, [0.25, 0.75])
    assert f[age >= hi].mean() - f[age <= lo].mean() > 0.1  # age -> finding
    assert abs(f[a["sex"] == 1].mean() - f[a["sex"] == 0].mean()) < 0.02  # no sex -> finding
    rates = [f[a["race"] == r].mean() for r in range(3)]
    assert max(rates) - min(rates) < 0.04  # no race -> finding
    assert abs(a["sex"].mean() - cfg.p_female) < 0.01
    assert np.allclose(np.bincount(a["race"]) / len(age), cfg.race_probs, atol=0.01)
    # The roots are independent of each other.
    assert abs(np.corrcoef(a["sex"], age)[0, 1]) < 0.02
    # The mechanism is exactly the Gumbel-max over (0, slope * age_model + bias).
    logit = cfg.finding_age_slope * (age / 100 * 2 - 1) + cfg.finding_bias
    assert np.array_equal(f, (logit + exo["g1"] > exo["g0"]).astype(int))


def test_stronger_slope_strengthens_age_effect():
    _, _, weak = _population(20000, finding_age_slope=0.0)
    _, _, strong = _population(20000, finding_age_slope=3.0)

    def gap(a):
        old = a["age"] > np.median(a["age"])
        return a["finding"][old].mean() - a["finding"][~old].mean()

    assert abs(gap(weak)) < 0.03 and gap(strong) > 0.15


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    synth.generate_dataset(root, _cfg(n_images=300, resolution=32, seed=5))
    return root


def test_null_intervention_is_bit_exact(small_data):
    frame = split_frame(small_data, "all")
    from cxrcf.data import read_image

    stored = np.stack([read_image(small_data / p) for p in frame["path"]])
    assert np.array_equal(synth.render_counterfactuals(frame, {}), stored)
    # One record alone (a dict of one CSV row) renders the same bytes as within its batch.
    record = frame.iloc[17].to_dict()
    assert np.array_equal(synth.render_counterfactual(record, {}), stored[17])
    # Intervening to the factual values is also the identity.
    same = {"sex": frame["sex"].to_numpy(), "age": frame["age"].to_numpy()}
    assert np.array_equal(synth.render_counterfactuals(frame, same), stored)


def _variants(frame, **do):
    return synth.render_counterfactuals(frame, do).astype(np.int32)


def test_do_sex_changes_sex_linked_pixels_not_the_effusion(small_data):
    frame = split_frame(small_data, "all")
    n = len(frame)
    flipped = np.where(frame["sex"].to_numpy() == "female", 0, 1)
    x = _variants(frame)
    x_sex = _variants(frame, sex=flipped)
    assert (x_sex != x).any(axis=(1, 2)).mean() > 0.9
    # The effusion's own contribution (finding=1 minus finding=0) is the same whatever the sex.
    ones, zeros = np.ones(n, int), np.zeros(n, int)
    eff = _variants(frame, finding=ones) - _variants(frame, finding=zeros)
    eff_sex = _variants(frame, finding=ones, sex=flipped) - _variants(frame, finding=zeros, sex=flipped)
    region = np.abs(eff) > 8
    assert region.sum() > 1000
    assert np.abs(eff_sex - eff)[region].mean() < 0.1 * np.abs(eff)[region].mean()
    # The sex-linked statistic (breast-zone brightness relative to the apices) moves with sex.
    r = x.shape[-1]
    zone = slice(int(0.55 * r), int(0.7 * r))
    female = (frame["sex"] == "female").to_numpy()
    change = (x_sex[:, zone].mean(axis=(1, 2)) - x[:, zone].mean(axis=(1, 2)))
    assert change[female].mean() < -2 and change[~female].mean() > 2


def test_do_finding_changes_only_the_basal_region(small_data):
    frame = split_frame(small_data, "all")
    n = len(frame)
    x0 = _variants(frame, finding=np.zeros(n, int))
    x1 = _variants(frame, finding=np.ones(n, int))
    r = x0.shape[-1]
    assert np.array_equal(x0[:, : int(0.2 * r)], x1[:, : int(0.2 * r)])  # apices untouched
    lower = slice(int(0.6 * r), int(0.85 * r))
    gain = (x1[:, lower] - x0[:, lower]).mean(axis=(1, 2))
    assert (gain >= 0).all() and np.median(gain) > 1
    # Effusion size is continuous: some are large, some practically invisible.
    assert (gain > 5).mean() > 0.1 and (gain < 0.5).mean() > 0.05


def test_hidden_noise_leaves_no_trace_in_an_image_without_the_attribute(small_data):
    """What HIDDEN_WHEN_ABSENT claims, checked against the renderer: redrawing that noise changes no
    factual image, yet changes the true counterfactual of adding the attribute."""
    frame = split_frame(small_data, "all")
    absent = (frame["finding"] == "no_finding").to_numpy()
    assert absent.any() and (~absent).any()
    redrawn = synth.redraw_hidden_noise(frame, "finding", seed=3)
    for name in set(frame.columns) - set(synth.HIDDEN_WHEN_ABSENT["finding"]):
        assert frame[name].equals(redrawn[name]), name
    for name in synth.HIDDEN_WHEN_ABSENT["finding"]:
        assert np.array_equal(frame[name].to_numpy()[~absent], redrawn[name].to_numpy()[~absent])
        assert not np.array_equal(frame[name].to_numpy()[absent], redrawn[name].to_numpy()[absent])
    assert np.array_equal(synth.render_counterfactuals(frame, {}), synth.render_counterfactuals(redrawn, {}))
    added = {"finding": np.ones(len(frame), int)}
    x_true, x_drawn = synth.render_counterfactuals(frame, added), synth.render_counterfactuals(redrawn, added)
    assert np.array_equal(x_true[~absent], x_drawn[~absent])
    assert (np.abs(x_true[absent].astype(int) - x_drawn[absent]).max(axis=(1, 2)) > 0).mean() > 0.5


def test_do_age_recomputes_finding_from_its_noise(small_data):
    frame = split_frame(small_data, "all")
    n = len(frame)
    old = synth.counterfactual_attributes(frame, {"age": np.full(n, 95.0)})
    factual = (frame["finding"] == "pleural_effusion").to_numpy().astype(int)
    assert (old["finding"] >= factual).all()  # the logit rises with age: 1 never turns into 0
    flipped = np.flatnonzero(old["finding"] != factual)
    assert len(flipped) > 5
    young = synth.counterfactual_attributes(frame, {"age": np.full(n, 18.0)})
    assert (young["finding"] <= factual).all() and (young["finding"] != factual).any()
    # Intervening on age and finding together keeps the requested finding.
    both = synth.counterfactual_attributes(frame, {"age": np.full(n, 95.0), "finding": np.zeros(n, int)})
    assert (both["finding"] == 0).all()
    # The rendered counterfactual shows the new effusion.
    i = int(flipped[0])
    record = frame.iloc[i].to_dict()
    aged = synth.render_counterfactual(record, {"age": 95.0})
    aged_no_finding = synth.render_counterfactual(record, {"age": 95.0, "finding": 0})
    assert not np.array_equal(aged, aged_no_finding)


def test_counterfactual_errors_name_the_problem(small_data):
    frame = split_frame(small_data, "all")
    with pytest.raises(CxrcfError, match="weight"):
        synth.render_counterfactuals(frame, {"weight": np.ones(len(frame))})
    with pytest.raises(CxrcfError, match="race"):
        synth.render_counterfactual(frame.iloc[0].to_dict(), {"race": "martian"})
    with pytest.raises(CxrcfError, match=r"do: sex = 0\.5 is outside codes 0-1"):
        synth.render_counterfactuals(frame, {"sex": np.full(len(frame), 0.5)})
    with pytest.raises(CxrcfError, match="do: age = 130"):
        synth.render_counterfactuals(frame, {"age": np.full(len(frame), 130.0)})
    with pytest.raises(CxrcfError, match="missing column"):
        synth.render_counterfactuals(frame[["id", "sex", "race", "age", "finding"]], {})


def test_resolution_is_a_parameter(small_data):
    record = split_frame(small_data, "all").iloc[3].to_dict()
    for res in (16, 64, 224):
        img = synth.render_counterfactual(record, {}, resolution=res)
        assert img.shape == (res, res) and img.dtype == np.uint8 and 40 < img.mean() < 200


def test_generation_is_bit_deterministic(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    cfg = _cfg(n_images=40, resolution=32, seed=11)
    synth.generate_dataset(tmp_path / "a", cfg)
    synth.generate_dataset(tmp_path / "b", cfg)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert len(a) == 45 and a == b
    synth.generate_dataset(tmp_path / "c", cfg.model_copy(update={"seed": 12}))
    c = files(tmp_path / "c")
    assert c["metadata.csv"] != a["metadata.csv"] and c["images/cxr000000.png"] != a["images/cxr000000.png"]
    # Regenerating in place replaces the dataset; nothing temporary is left beside it.
    synth.generate_dataset(tmp_path / "a", cfg)
    assert files(tmp_path / "a") == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CxrcfError, match="not a dataset folder"):
        synth.generate_dataset(tmp_path, _cfg(n_images=10))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_finding_is_visible_but_ambiguous():
    """A linear probe on pixels beats chance clearly but is far from perfect (ambiguous effusions)."""
    n, n_train = 2000, 1500
    _, exo, a = _population(n, seed=9)
    x = to_model_images(synth.render(a, exo, 32), 16).reshape(n, -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(a["finding"], dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        torch.manual_seed(0)
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.02)
        for _ in range(200):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:n_train] @ w + b, y[:n_train])
            (loss + 1e-3 * (w**2).sum()).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc = (((x[n_train:] @ w + b) > 0).float() == y[n_train:]).float().mean().item()
    chance = max(y[n_train:].mean().item(), 1 - y[n_train:].mean().item())
    assert chance + 0.07 < acc < 0.95, (acc, chance)


def test_worker_processes_write_the_same_bytes(tmp_path):
    """The default dataset is written by two processes; the bytes must not depend on that."""
    cfg = _cfg(n_images=1100, resolution=16, seed=2)  # more than one job of 1024 images
    synth.generate_dataset(tmp_path / "one", cfg, workers=1)
    synth.generate_dataset(tmp_path / "two", cfg, workers=2)
    for name in ("metadata.csv", "exogenous.csv", "dataset.json", "images/cxr000003.png", "images/cxr001099.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    one = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) and len(one) == 1100


def test_evidence_file_is_what_the_renderer_painted(small_data):
    frame = split_frame(small_data, "all")
    ev = synth.load_evidence(small_data)
    assert list(ev.columns) == ["id", *synth.EVIDENCE_COLUMNS] and list(ev["id"]) == list(frame["id"])
    again = synth.counterfactual_evidence(frame, {})
    for col in synth.EVIDENCE_COLUMNS:
        assert np.allclose(ev[col].to_numpy(), again[col], atol=1e-6), col
    # A dataset without evidence.csv gets the same numbers recomputed from its noise.
    (small_data / "evidence.csv").rename(small_data / "evidence.bak")
    try:
        recomputed = synth.load_evidence(small_data)
    finally:
        (small_data / "evidence.bak").rename(small_data / "evidence.csv")
    assert np.allclose(recomputed[list(synth.EVIDENCE_COLUMNS)].to_numpy(),
                       ev[list(synth.EVIDENCE_COLUMNS)].to_numpy(), atol=1e-6)
    finding = (frame["finding"] == "pleural_effusion").to_numpy()
    assert (ev["eff_max"][~finding] == 0).all() and (ev["eff_max"][finding] > 0).all()
    # The effusion is painted on the side the evidence names: removing it changes only that half.
    x = _variants(frame)
    x0 = _variants(frame, finding=np.zeros(len(frame), int))
    half = x.shape[-1] // 2
    right_only = finding & (ev["eff_right"] > 0.05).to_numpy() & (ev["eff_left"] == 0).to_numpy()
    left_only = finding & (ev["eff_left"] > 0.05).to_numpy() & (ev["eff_right"] == 0).to_numpy()
    assert right_only.sum() >= 3 and left_only.sum() >= 3
    diff = np.abs(x - x0)
    assert diff[right_only][:, :, :half].sum() > 20 * diff[right_only][:, :, half:].sum()
    assert diff[left_only][:, :, half:].sum() > 20 * diff[left_only][:, :, :half].sum()
    # A larger recorded effusion is a brighter base.
    lower = slice(int(0.6 * x.shape[1]), int(0.85 * x.shape[1]))
    gain = (x - x0)[finding][:, lower].mean(axis=(1, 2))
    assert np.corrcoef(gain, ev["eff_max"][finding])[0, 1] > 0.8


def test_true_counterfactual_evidence_moves_only_the_intervened_attribute(small_data):
    frame = split_frame(small_data, "all")
    n = len(frame)
    base = synth.counterfactual_evidence(frame, {})
    flipped_sex = np.where(frame["sex"].to_numpy() == "female", 0, 1)
    cases = {"sex": flipped_sex, "finding": 1 - (frame["finding"] == "pleural_effusion").to_numpy().astype(int),
             "race": (frame["race"].map({"white": 0, "asian": 1, "black": 2}).to_numpy() + 1) % 3}
    for k, value in cases.items():
        cf = synth.counterfactual_evidence(frame, {k: value})
        for attr, cols in synth.EVIDENCE_OF.items():
            for col in cols:
                moved = np.abs(cf[col] - base[col]) > 1e-9
                if attr == k:
                    assert moved.mean() > 0.5, (k, col)
                else:
                    assert not moved.any(), (k, col)
    # do(sex) to female never lowers the breast amplitude, to male never raises it.
    cf = synth.counterfactual_evidence(frame, {"sex": np.ones(n, int)})
    assert (cf["breast_amp"] >= base["breast_amp"]).all()
    with pytest.raises(CxrcfError, match="missing column"):
        synth.counterfactual_evidence(frame[["id", "sex", "race", "age", "finding"]], {})


def test_evidence_file_errors_name_file_row_and_column(tmp_path):
    root = tmp_path / "d"
    synth.generate_dataset(root, _cfg(n_images=12, resolution=16, seed=1))
    text = (root / "evidence.csv").read_text().splitlines()
    cells = text[3].split(",")
    cells[2] = "abc"
    text[3] = ",".join(cells)
    (root / "evidence.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(CxrcfError, match=r"evidence.csv: row 4: column eff_left = 'abc' is not a number"):
        synth.load_evidence(root)


def test_ambiguity_strata_come_from_the_simulators_noise():
    _, exo, a = _population(20000, seed=4)
    st = synth.ambiguity_strata(a, exo)
    ev = synth.evidence(a, exo)
    female = a["sex"] == 1
    amb = st["sex"]["stratum"] == "ambiguous"
    assert 0.2 < amb.mean() < 0.5
    # Ambiguous women have the breast shadows of men, ambiguous men those of women.
    assert np.median(ev["breast_amp"][female & amb]) < np.median(ev["breast_amp"][female & ~amb])
    assert np.median(ev["breast_amp"][~female & amb]) > np.median(ev["breast_amp"][~female & ~amb])
    assert np.median(ev["shoulder_amp"][female & amb]) > np.median(ev["shoulder_amp"][female & ~amb])
    # Finding: only small effusions are ambiguous; without one there is no painted fluid to doubt.
    famb = st["finding"]["stratum"] == "ambiguous"
    assert (a["finding"][famb] == 1).all() and (ev["eff_max"][famb] < synth.SMALL_EFFUSION).all()
    assert 0.2 < famb[a["finding"] == 1].mean() < 0.6
    # Race is weakly painted: most images are ambiguous, and the clear ones have typical texture.
    ramb = st["race"]["stratum"] == "ambiguous"
    assert ramb.mean() > 0.6 and np.abs(exo["z_texture"][~ramb & (a["race"] == 1)]).mean() < 1.5
    # An intervention on sex leaves the finding and race strata alone.
    flipped = dict(a, sex=1 - a["sex"])
    st2 = synth.ambiguity_strata(flipped, exo)
    assert np.array_equal(st2["finding"]["stratum"], st["finding"]["stratum"])
    assert np.array_equal(st2["race"]["stratum"], st["race"]["stratum"])
