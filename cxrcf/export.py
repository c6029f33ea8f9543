"""Pickle-free model directories: `config.json` + `model.safetensors`.

`config.json`: {"format_version", "kind" (hvae | predictor | scm), "config" (the pydantic
arch/config dump the module is rebuilt from), "meta" (free JSON metadata)}. Weights are the module's
state dict in safetensors, loaded back with strict key checking. Nothing here unpickles.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from cxrcf.errors import CxrcfError
from cxrcf.fileio import atomic_path, read_json

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# kind -> (module, class, pydantic config class, the module attribute holding that config)
_KINDS: dict[str, tuple[str, str, str, str]] = {
    "hvae": ("cxrcf.hvae", "HVAE", "HVAEArch", "arch"),
    "predictor": ("cxrcf.predictor", "Predictor", "PredictorArch", "arch"),
    "scm": ("cxrcf.scm", "AttributeSCM", "SCMConfig", "cfg"),
}


def _class(kind: str):
    module, name, _, _ = _KINDS[kind]
    return getattr(importlib.import_module(module), name)


def model_kind(model) -> str:
    for kind, (module, name, _, _) in _KINDS.items():
        # Match by qualified name so saving a predictor never imports the (heavier) HVAE module.
        cls = type(model)
        if cls.__module__ == module and cls.__name__ == name:
            return kind
    raise CxrcfError(f"save_model: cannot export a {type(model).__name__}; expected HVAE, Predictor or AttributeSCM")


def save_model(model, directory: str | Path, meta: dict | None = None) -> Path:
    """Write `directory` atomically (replacing any previous export there)."""
    from safetensors.torch import save_file

    kind = model_kind(model)
    cfg = getattr(model, _KINDS[kind][3])
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    config = {"format_version": FORMAT_VERSION, "kind": kind, "config": cfg.model_dump(mode="json"),
              "meta": meta or {}}
    text = json.dumps(config, indent=2, sort_keys=True)  # fails here, before writing, if meta is not JSON
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(text + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"kind": kind, "format_version": str(FORMAT_VERSION)})
    return directory


def require_model_dir(directory: str | Path, flag: str | None = None, role: str = "model") -> Path:
    """`directory` as a Path, or the one "model directory does not exist" error (naming `flag`, if any)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CxrcfError(f"{flag + ' ' if flag else ''}{directory}: {role} directory does not exist")
    return directory


def read_config(directory: str | Path) -> dict:
    """The parsed `config.json` of an export directory (validated shape)."""
    directory = require_model_dir(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CxrcfError(f"{directory}: missing {CONFIG_FILE}; not an exported model")
    config = read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise CxrcfError(f"{path}: expected an object with 'kind' and 'config'")
    if config.get("kind") not in _KINDS:
        raise CxrcfError(f"{path}: kind = {config.get('kind')!r}: unknown; expected one of {', '.join(_KINDS)}")
    if config.get("format_version") != FORMAT_VERSION:
        raise CxrcfError(f"{path}: format_version = {config.get('format_version')!r}: expected {FORMAT_VERSION}")
    return config


def load_model(directory: str | Path, device="cpu"):
    """Rebuild the module from `config.json`, load `model.safetensors` strictly; returned in eval mode."""
    import pydantic
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cxrcf import config as config_module
    from cxrcf.config import format_validation_error

    directory = Path(directory)
    config = read_config(directory)
    kind = config["kind"]
    cfg_class = getattr(config_module, _KINDS[kind][2])
    try:
        cfg = cfg_class.model_validate(config["config"])
    except pydantic.ValidationError as err:
        raise CxrcfError(format_validation_error(err, str(directory / CONFIG_FILE))) from None
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CxrcfError(f"{directory}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CxrcfError(f"{weights}: unreadable safetensors file: {err}") from None
    model = _class(kind)(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CxrcfError(f"{weights}: weights do not match the {kind} config: "
                         f"{' '.join(line.strip() for line in first)[:500]}") from None
    return model.to(device).eval()
