"""The four parents of an image: their vocabularies, codes and the HVAE context vector.

Codes follow SCIENCE.md section 2: sex 0 male / 1 female; race 0 white / 1 asian / 2 black;
finding 0 no_finding / 1 pleural_effusion; age in years, model space age/100*2-1.
Context vector (6 numbers, in this order): age, race one-hot (3), sex, finding.
"""

from __future__ import annotations

from collections.abc import Mapping

ATTRIBUTES: tuple[str, ...] = ("sex", "race", "age", "finding")
BINARY = ("sex", "finding")
CATEGORICAL = ("race",)
CONTINUOUS = ("age",)

VOCAB: dict[str, tuple[str, ...]] = {
    "sex": ("male", "female"),
    "race": ("white", "asian", "black"),
    "finding": ("no_finding", "pleural_effusion"),
}
N_RACE = 3
CONTEXT_DIM = 6
AGE_MIN, AGE_MAX = 0.0, 120.0

# Causal graph among the attributes: age -> finding is the only edge.
CHILDREN: dict[str, tuple[str, ...]] = {"sex": (), "race": (), "age": ("finding",), "finding": ()}


def descendants(attr: str) -> set[str]:
    out: set[str] = set()
    stack = list(CHILDREN[attr])
    while stack:
        a = stack.pop()
        if a not in out:
            out.add(a)
            stack.extend(CHILDREN[a])
    return out


def encode(attr: str, value) -> float | int:
    """Label string (or code) -> numeric code; age stays years. Raises ValueError naming the attribute."""
    from cxrcf.errors import CxrcfError

    if attr == "age":
        try:
            age = float(value)
        except (TypeError, ValueError):
            raise CxrcfError(f"age: {value!r} is not a number of years") from None
        if not (AGE_MIN <= age <= AGE_MAX):
            raise CxrcfError(f"age: {age} is outside {AGE_MIN:g}-{AGE_MAX:g} years")
        return age
    if attr not in VOCAB:
        raise CxrcfError(f"unknown attribute {attr!r}; expected one of {', '.join(ATTRIBUTES)}")
    vocab = VOCAB[attr]
    if isinstance(value, str):
        if value in vocab:
            return vocab.index(value)
        raise CxrcfError(f"{attr}: unknown value {value!r}; expected one of {', '.join(vocab)}")
    try:
        code = int(value)
    except (TypeError, ValueError):
        raise CxrcfError(f"{attr}: unknown value {value!r}; expected one of {', '.join(vocab)}") from None
    if code != value or not 0 <= code < len(vocab):
        raise CxrcfError(f"{attr}: code {value!r} out of range 0-{len(vocab) - 1}")
    return code


def decode(attr: str, code) -> str | float:
    if attr == "age":
        return float(code)
    return VOCAB[attr][int(code)]


def encode_parents(parents: Mapping[str, object]) -> dict[str, float | int]:
    missing = [a for a in ATTRIBUTES if a not in parents]
    if missing:
        from cxrcf.errors import CxrcfError

        raise CxrcfError(f"parents: missing {', '.join(missing)}")
    return {a: encode(a, parents[a]) for a in ATTRIBUTES}


def age_to_model(age_years):
    """Years -> model space [-1, 1] (works on floats, numpy arrays and torch tensors)."""
    return age_years / 100.0 * 2.0 - 1.0


def age_from_model(age_model):
    return (age_model + 1.0) / 2.0 * 100.0


# Where each parent sits in the context vector built by `context`.
CONTEXT_COLUMNS: dict[str, tuple[int, ...]] = {"age": (0,), "race": (1, 2, 3), "sex": (4,), "finding": (5,)}


def context(parents):
    """Parents dict of torch tensors (N,) -> context (N, 6): age, race one-hot, sex, finding."""
    import torch

    age = age_to_model(parents["age"].float()).unsqueeze(1)
    race = torch.nn.functional.one_hot(parents["race"].long(), N_RACE).float()
    sex = parents["sex"].float().unsqueeze(1)
    finding = parents["finding"].float().unsqueeze(1)
    return torch.cat([age, race, sex, finding], dim=1)
