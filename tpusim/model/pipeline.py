"""Pipeline parallelism as a workload describes it: stages, microbatches, repeats, schedule.

MaxText's keys (``base.yml``, "pipeline parallelism"): the ``stage`` mesh axis is
``ici_pipeline_parallelism`` x ``dcn_pipeline_parallelism`` (placed by :mod:`tpusim.model.mesh`);
``num_pipeline_microbatches`` (-1: the number of stages, twice that with
``pipeline_delay_activation_forwarding``); ``num_pipeline_repeats`` (-1: layers / (stages x
``num_layers_per_pipeline_stage``), MaxText's circular pipeline: each stage holds ``repeats``
non-contiguous chunks of layers); ``pipeline_fsdp_ag_once`` (weights gathered over FSDP once, not
per microbatch). MaxText runs one schedule, a circular GPipe (every forward, then every backward).

``pipeline_schedule`` is tpusim's own key (MaxText has no such choice): ``gpipe`` (MaxText's; with
repeats, circular), ``1f1b`` (the Ultra-Scale Playbook's one-forward-one-backward, one chunk per
stage) or ``interleaved`` (the Playbook's / Megatron's interleaved 1F1B over ``repeats`` chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpusim.errors import TpusimError

SCHEDULES = ("gpipe", "1f1b", "interleaved")

# Flat keys, (type, default) as in base.yml; pipeline_schedule is tpusim's.
PIPELINE_KEYS: dict[str, tuple[type, Any]] = {
    "num_pipeline_microbatches": (int, -1),
    "num_pipeline_repeats": (int, -1),
    "num_layers_per_pipeline_stage": (int, 1),
    "pipeline_delay_activation_forwarding": (bool, False),
    "pipeline_fsdp_ag_once": (bool, False),
    "pipeline_schedule": (str, "gpipe"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Pipeline:
    """The pipeline settings as given (-1 resolved against the stage count by :func:`resolve`)."""

    microbatches: int = -1
    repeats: int = -1
    layers_per_stage: int = 1
    delay_forwarding: bool = False
    fsdp_ag_once: bool = False
    schedule: str = "gpipe"


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelinePlan:
    """Resolved: ``stages`` p, ``microbatches`` m, ``repeats`` v (chunks per stage), ``layers_per_chunk``."""

    stages: int
    microbatches: int
    repeats: int
    layers_per_chunk: int
    schedule: str
    delay_forwarding: bool
    fsdp_ag_once: bool
    over_dcn: bool


def pipeline_from_values(values: dict, source: str, where: dict) -> Pipeline:
    """The :class:`Pipeline` of a workload's (typed) values, with the checks that need no mesh."""
    def key(k):
        return where.get(k, k)

    for k in ("num_pipeline_microbatches", "num_pipeline_repeats"):
        if values[k] < 1 and values[k] != -1:
            raise TpusimError(f"{values[k]!r} must be a positive integer or -1 (MaxText's default)",
                              source=source, key=key(k))
    if values["num_layers_per_pipeline_stage"] < 1:
        raise TpusimError(f"{values['num_layers_per_pipeline_stage']!r} must be a positive integer", source=source,
                          key=key("num_layers_per_pipeline_stage"))
    if values["pipeline_schedule"] not in SCHEDULES:
        raise TpusimError(f"{values['pipeline_schedule']!r} is not one of {', '.join(SCHEDULES)} (tpusim's key: "
                          "MaxText runs gpipe)", source=source, key=key("pipeline_schedule"))
    return Pipeline(microbatches=values["num_pipeline_microbatches"], repeats=values["num_pipeline_repeats"],
                    layers_per_stage=values["num_layers_per_pipeline_stage"],
                    delay_forwarding=values["pipeline_delay_activation_forwarding"],
                    fsdp_ag_once=values["pipeline_fsdp_ag_once"], schedule=values["pipeline_schedule"])


def resolve(pp: Pipeline, *, stages: int, over_dcn: bool, layers: int, sequences: float,
            grad_accum: int, source: str) -> PipelinePlan:
    """Fill MaxText's -1 defaults and check divisibility: layers % (stages x repeats), microbatches a
    multiple of the stages (MaxText's rule; twice with delayed forwarding), the stage's sequences %
    microbatches. One :class:`TpusimError` naming the key for each."""
    p = stages
    if pp.repeats == -1 and pp.schedule == "1f1b":
        v = 1  # (the Playbook's 1F1B: one contiguous chunk per stage)
    elif pp.repeats == -1:
        if layers % (p * pp.layers_per_stage):
            raise TpusimError(f"{layers} layers do not split into {p} stages x {pp.layers_per_stage} layers per "
                              "stage x whole repeats", source=source, key="num_layers_per_pipeline_stage")
        v = layers // (p * pp.layers_per_stage)
    else:
        v = pp.repeats
    if layers % (p * v):
        raise TpusimError(f"{layers} layers do not split evenly into {p} stages x {v} repeats", source=source,
                          key="num_pipeline_repeats" if pp.repeats != -1 else "ici_pipeline_parallelism")
    m = pp.microbatches if pp.microbatches != -1 else (2 * p if pp.delay_forwarding else p)
    need = 2 * p if pp.delay_forwarding else p
    if m % p or m < need:
        more = " and at least twice the stages with pipeline_delay_activation_forwarding" if pp.delay_forwarding else ""
        raise TpusimError(f"{m} microbatches: MaxText needs a multiple of the {p} stages{more}", source=source,
                          key="num_pipeline_microbatches")
    if sequences % m:
        raise TpusimError(f"{m} microbatches do not split the {sequences:g} sequences each stage's batch shard "
                          "computes (per_device_batch_size x devices / data shards)", source=source,
                          key="num_pipeline_microbatches")
    if pp.schedule == "1f1b" and v != 1:
        raise TpusimError(f"1f1b holds one chunk of layers per stage but num_pipeline_repeats is {v} (use "
                          "interleaved, or num_pipeline_repeats: 1)", source=source, key="pipeline_schedule")
    if pp.schedule == "interleaved" and v < 2:
        raise TpusimError("interleaved needs num_pipeline_repeats >= 2 chunks per stage", source=source,
                          key="pipeline_schedule")
    if pp.delay_forwarding and pp.schedule != "gpipe":
        raise TpusimError(f"MaxText's delayed activation forwarding is part of its gpipe schedule, not {pp.schedule} "
                          "(tpusim's)", source=source, key="pipeline_delay_activation_forwarding")
    if grad_accum > 1:
        raise TpusimError("gradient accumulation with pipeline parallelism: not modelled yet by tpusim (the "
                          "pipeline's microbatches already accumulate)", source=source,
                          key="gradient_accumulation_steps")
    return PipelinePlan(stages=p, microbatches=m, repeats=v, layers_per_chunk=layers // (p * v),
                        schedule=pp.schedule, delay_forwarding=pp.delay_forwarding, fsdp_ag_once=pp.fsdp_ag_once,
                        over_dcn=over_dcn)
