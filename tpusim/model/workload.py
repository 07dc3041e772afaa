"""Workloads: what runs (the model), the step, and how it is sharded, in MaxText's parameter names.

A workload YAML is either sectioned::

    name: fsdp-70b
    chip: v5e
    model: {model_name: llama3-70b}
    step: {per_device_batch_size: 1, max_target_length: 4096, remat_policy: full}
    sharding: {ici_fsdp_parallelism: -1}

or a MaxText config with flat keys, as it is. Keys MaxText has but that do not change performance
(paths, learning rate, logging, ...) are ignored and listed once in ``Workload.ignored_keys``; keys
known to neither vocabulary are errors naming the key. :func:`load_workload` returns frozen
dataclasses; sizes of ``-1`` ("the rest") are resolved against a topology by :mod:`tpusim.model.mesh`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from tpusim.model import maxtext
from tpusim.model.pipeline import pipeline_from_values
from tpusim.config import read_yaml, unknown_key_reason
from tpusim.data import data_dir
from tpusim.errors import TpusimError

from tpusim.model.build import (_ALIASES, _SECTIONS, _TOP_KEYS, MAXTEXT_LEGACY_IGNORED, MAXTEXT_LEGACY_INT8, REQUIRED,
                                _model, _parallelism, _step, _typed)
from tpusim.model.spec import Workload  # (and Model, Step, Parallelism: tpusim.model.spec)


@cache
def model_presets() -> dict[str, dict]:
    return read_yaml(data_dir("workloads") / "models.yaml") or {}


def load_workload(path: str | Path, overrides: dict[str, Any] | None = None) -> Workload:
    """Read a workload YAML (sectioned or flat MaxText) into a :class:`Workload`.

    ``overrides`` are flat MaxText keys (e.g. from ``tpusim sweep --vary``) applied after the file.
    """
    path = Path(path)
    raw = read_yaml(path)
    return workload_from_dict(raw, source=str(path), overrides=overrides)


def workload_from_dict(raw: Any, *, source: str, overrides: dict[str, Any] | None = None) -> Workload:
    """MaxText's layering: ``base_config`` (e.g. ``base.yml``), then the file ``model_name`` names,
    then the workload's own keys, then ``overrides``; each key then classified (:mod:`tpusim.model.maxtext`)."""
    if not isinstance(raw, dict):
        raise TpusimError("a workload is a mapping of keys to values", source=source)
    own: list[tuple[str, Any, str]] = []  # (key, value, dotted key in the file)
    top: dict[str, Any] = {}

    def check_section(key: str, dotted: str, section: str) -> None:
        if key not in _SECTIONS[section]:
            other = next((s for s, keys in _SECTIONS.items() if key in keys), None)
            if other is not None:
                raise TpusimError(f"belongs in section '{other}', not '{section}'", source=source, key=dotted)

    for key, value in raw.items():
        key = str(key)
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise TpusimError("expected a mapping", source=source, key=key)
            for sub, v in value.items():
                k = _ALIASES.get(str(sub), str(sub))
                check_section(k, f"{key}.{sub}", key)
                own.append((k, v, f"{key}.{sub}"))
        elif key in _TOP_KEYS:
            top[key] = _typed(key, value, _TOP_KEYS[key], source)
        else:
            own.append((_ALIASES.get(key, key), value, key))
    over = [(_ALIASES.get(str(k), str(k)), v, f"{k} (override)") for k, v in (overrides or {}).items()]

    # The layers, lowest first: base config, model file, the workload's keys, the overrides.
    layers: list[tuple[str, list[tuple[str, Any, str]]]] = []
    if "base_config" in top:
        base_name = top["base_config"]
        base = _base_config(base_name, source)
        layers.append(("base", [(_ALIASES.get(str(k), str(k)), v, f"{k} ({base_name})") for k, v in base.items()
                                if str(k) != "base_config"]))
    # model_name may come from the base_config chain too (MaxText's inference configs name their model)
    named_in = [e for _, entries in layers for e in entries] + own + over
    named = [v for k, v, _ in named_in if k == "model_name"]
    preset_name = None
    if named and named[-1] != "default":  # MaxText's sentinel for "no model file"
        where_name = next(d for k, _, d in reversed(named_in) if k == "model_name")
        preset_name = _typed(where_name, named[-1], str, source)
        preset = maxtext.model_file(preset_name)
        if preset is None:
            preset = model_presets().get(preset_name)
        if preset is None:
            names = sorted({*model_presets(), *maxtext.model_names()})
            raise TpusimError(unknown_key_reason(str(preset_name), names).replace("unknown key", "unknown model")
                              + f" ({len(names)} models: workloads/maxtext/models/*.yml)", source=source,
                              key=where_name)
        layers.append(("model", [(str(k), v, f"{k} (model_name {preset_name})") for k, v in preset.items()]))
    layers += [("file", own), ("override", over)]

    flat: dict[str, Any] = {}
    where: dict[str, str] = {}  # flat key -> dotted key in the file, for messages
    origin: dict[str, str] = {}
    for layer, entries in layers:
        for key, value, dotted in entries:
            flat[key], where[key], origin[key] = value, dotted, layer

    ignored: list[str] = []
    notes: list[str] = []
    vocab = {k for keys in _SECTIONS.values() for k in keys}
    for key, value in list(flat.items()):
        if key in vocab:
            continue
        if key == "num_slices":
            n = _typed(where[key], value, int, source)
            if n != -1 and "slices" not in top:
                top["slices"] = n
        elif key == MAXTEXT_LEGACY_INT8:
            if _typed(where[key], value, bool, source) and not flat.get("quantization"):
                flat["quantization"], where["quantization"] = "int8", where[key]
        elif key in maxtext.REFUSED_KEYS:
            if not maxtext.is_default(key, value):
                group = maxtext.REFUSED[maxtext.REFUSED_KEYS[key]][0]
                raise TpusimError(f"{value!r}: not modelled yet by tpusim ({group}); MaxText's default is "
                                  f"{maxtext.default(key)!r}", source=source, key=where[key])
        elif key in maxtext.NOTED_KEYS:
            if not maxtext.is_default(key, value):
                notes.append(f"{key}={value!r}")
        elif key in maxtext.IGNORED_KEYS or key in MAXTEXT_LEGACY_IGNORED:
            if origin[key] in ("file", "override"):
                ignored.append(where[key])
        else:
            known = [*vocab, *_TOP_KEYS, *_SECTIONS, *maxtext.IGNORED_KEYS, *maxtext.NOTED_KEYS,
                     *maxtext.REFUSED_KEYS]
            raise TpusimError(unknown_key_reason(key, known), source=source,
                              key=key if origin[key] == "override" else where[key])

    values: dict[str, Any] = {}
    for keys in _SECTIONS.values():
        for key, (typ, default) in keys.items():
            if key in flat:
                values[key] = _typed(where[key], flat[key], typ, source)
            elif default is REQUIRED:
                raise TpusimError("required key is missing", source=source, key=key)
            else:
                values[key] = default

    model = _model(values, preset_name, source, where)
    step = _step(values, source, where)
    parallelism = _parallelism(values, source, where)
    pipeline = pipeline_from_values(values, source, where)
    if top.get("slices") is not None and top["slices"] < 1:
        raise TpusimError(f"{top['slices']!r} must be a positive integer", source=source, key="slices")
    ep = parallelism.ici.get("expert", 1)
    if model.num_experts == 1 and ep != 1:
        raise TpusimError(f"{ep} but the model is dense (num_experts 1): expert parallelism splits a mixture "
                          f"of experts", source=source,
                          key=where.get("ici_expert_parallelism", "ici_expert_parallelism"))
    name = top.get("name") or Path(source).stem
    return Workload(name=name, source=source, model=model, step=step, parallelism=parallelism,
                    chip=top.get("chip"), topology=top.get("topology"), slices=top.get("slices"),
                    description=top.get("description", ""), ignored_keys=tuple(ignored), notes=tuple(notes),
                    pipeline=pipeline)


def maxtext_chain(name: Any, source: str) -> dict:
    """The keys of a ``base_config`` chain (what :func:`workload_from_dict` layers under a workload's own)."""
    if not isinstance(name, str):
        raise TpusimError(f"{name!r} is not a file name", source=source, key="base_config")
    return _base_config(name, source)


@cache
def _bundled_config(path: str) -> Any:
    """A config of workloads/maxtext/ (package data: read once per process; a sweep loads it per row)."""
    return read_yaml(path)


def _base_config(name: str, source: str, depth: int = 0) -> dict:
    """``base_config``: a file beside the file that names it, else one of ``workloads/maxtext/`` (a path
    inside it, e.g. ``inference/inference_jetstream.yml``); its own ``base_config`` is followed the same
    way, as MaxText does (``inference/multihost/interleaved/*.yml`` -> ``inference/inference_jetstream.yml``
    -> ``base.yml``). The keys of the whole chain, the nearest file winning."""
    try:
        parts = Path(name).parts
        here = Path(source).parent / name
        bundled = data_dir("workloads") / "maxtext" / name
        inside = not Path(name).is_absolute() and ".." not in parts
        path = here if here.is_file() else bundled if inside and bundled.is_file() else None
    except (OSError, ValueError):  # a name no file system has (a NUL byte, too long)
        path = None
    if path is None:
        raise TpusimError(f"{name!r}: no such file beside {Path(source).name} or in workloads/maxtext/", source=source,
                          key="base_config")
    root = data_dir("workloads") / "maxtext"
    data = _bundled_config(str(path)) if path.resolve().is_relative_to(root.resolve()) else read_yaml(path)
    if not isinstance(data, dict):
        raise TpusimError("a MaxText config is a mapping of keys to values", source=str(path))
    parent = data.get("base_config")
    if parent is None:
        return dict(data)
    if depth >= 8:
        raise TpusimError(f"{parent!r}: more than 8 base_config files in a chain (a loop?)", source=str(path),
                          key="base_config")
    if not isinstance(parent, str):
        raise TpusimError(f"{parent!r} is not a file name", source=str(path), key="base_config")
    return {**_base_config(parent, str(path), depth + 1), **{k: v for k, v in data.items() if k != "base_config"}}
