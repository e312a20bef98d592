"""`harness plan`: what a launch would do, checked before any GPU is spent, without starting a process.

    harness plan --config configs/bert_base_imdb.yaml --launch-config launch_configs/accelerate/deepspeed_zero2.yaml
    harness plan --config configs/bert_base_imdb.yaml --nodes 2 --gpus-per-node 8
    harness plan --config configs/quickstart.yaml --get train.output_dir      # one resolved value (for scripts)

The world size comes from, in order: --nodes/--gpus-per-node, Slurm's environment inside an allocation
(SLURM_JOB_NUM_NODES x SLURM_GPUS_ON_NODE), the launch config (num_machines, num_processes), else 1.
It fails with a one-line error on what would break a long job late.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate.commands.config.config_args import load_config_from_file
from transformers import AutoModelForSequenceClassification

from harness.config import Config
from harness.checkpoint import read_progress
from harness.distributed import (deepspeed_values, describe_fsdp, describe_zero, fill_deepspeed, read_deepspeed_json,
                                 resume_mode)
from harness.errors import BadInput, first_line
from harness.graphs import check_config as check_graphs_config
from harness.families import mask_setting, pad_token
from harness.modeling import check_model, load_model_config, load_tokenizer, model_shape, resolve_model_path
from harness.recipes import read_yaml_mapping
from harness.run_folder import RunFolder
from harness.schedule import Schedule, flops_upper_bound, training_flops_per_token
from harness.sources import load_split


@dataclass
class World:
    nodes: int
    processes: int
    source: str
    deepspeed_json: Optional[str] = None
    mixed_precision: str = "no"
    parallelism: str = "DDP"


def read_launch_config(path: Optional[str]) -> dict:
    if path is None:
        return {}
    p = Path(path)
    raw = read_yaml_mapping(p, "--launch-config file")
    try:  # what `accelerate launch` itself would refuse (unknown keys, bad values), refused here first
        load_config_from_file(str(p))
    except Exception as e:
        raise BadInput(f"--launch-config {p}: accelerate cannot use it: {first_line(e)}") from None
    return raw


def parallelism_from(launch: dict) -> tuple[str, str, Optional[str]]:
    """(what is sharded, mixed precision, DeepSpeed JSON) as the launch config states them.

    Under DeepSpeed the JSON's `bf16`/`fp16` blocks are the one source of precision: Accelerate refuses a
    `mixed_precision:` key in a launch config that names a DeepSpeed JSON, so it is refused here first.
    """
    kind = launch.get("distributed_type")
    if kind == "DEEPSPEED":
        ds_json = (launch.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if not ds_json:
            raise BadInput("the launch config uses DeepSpeed without deepspeed_config_file; harness expects a JSON in launch_configs/deepspeed/")
        if "mixed_precision" in launch:
            raise BadInput("the launch config names a DeepSpeed JSON and also sets mixed_precision, which Accelerate "
                           "refuses at start: remove mixed_precision and set \"bf16\": {\"enabled\": true} in the JSON")
        written = read_deepspeed_json(ds_json)
        precision = next((k for k in ("bf16", "fp16") if (written.get(k) or {}).get("enabled") is True), "no")
        return describe_zero(written.get("zero_optimization") or {}), precision, ds_json
    precision = str(launch.get("mixed_precision", "no"))
    if kind == "FSDP":
        fsdp = launch.get("fsdp_config") or {}
        reshard = str(fsdp.get("fsdp_reshard_after_forward", True)).lower() in ("true", "full_shard")
        offload = str(fsdp.get("fsdp_offload_params", False)).lower() == "true"
        return describe_fsdp(fsdp.get("fsdp_version", 1), reshard, offload), precision, None
    return "DDP", precision, None


def world_from(launch: dict, nodes: Optional[int], gpus_per_node: Optional[int], env=os.environ) -> World:
    what, precision, ds_json = parallelism_from(launch)
    launch_nodes = int(launch.get("num_machines", 1))
    launch_procs = int(launch.get("num_processes", 1))
    if launch_procs % launch_nodes:
        raise BadInput(f"launch config: num_processes={launch_procs} does not divide over num_machines={launch_nodes}")
    if nodes or gpus_per_node:
        n = nodes or launch_nodes
        g = gpus_per_node or launch_procs // launch_nodes
        return World(n, n * g, "command line", ds_json, precision, what)
    if env.get("SLURM_JOB_ID"):
        n = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE", "").split(":")[-1]
        g = int(gpus) if gpus and gpus.isdigit() else launch_procs // launch_nodes
        return World(n, n * g, f"Slurm job {env['SLURM_JOB_ID']}", ds_json, precision, what)
    return World(launch_nodes, launch_procs, "launch config" if launch else "default (one process)", ds_json, precision, what)


def split_size(cfg: Config, split: str, requested: Optional[int]) -> tuple[int, str]:
    d, m = cfg.data, cfg.model
    try:
        n = len(load_split(d, split, m.label_names, m.num_labels, m.problem_type))
    except BadInput as e:
        if "cannot load dataset" not in str(e):
            raise
        if requested is None:
            raise BadInput(f"{e}; to plan without it, set data.train_samples and data.eval_samples") from None
        return requested, f"{requested} (from data.*_samples: the dataset could not be opened here)"
    if requested is not None and requested < n:
        return requested, f"{requested} of {n}"
    return n, str(n)


def model_offline(cfg: Config) -> tuple[Optional[dict], Optional[tuple[int, int, int, int]]]:
    """(the model's family and choices, harness.modeling.model_shape built on the meta device), each None where a
    hub model's config cannot be read here (offline, no cache). Refuses a local model folder whose config cannot be
    read, what its family cannot do, a tokenizer with nothing to pad with, weight files cut short and a
    data.max_length the model cannot take."""
    local = Path(resolve_model_path(cfg.model.name_or_path)).is_dir()
    try:
        mc = load_model_config(cfg.model)
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    except BadInput:
        if local:
            raise  # a local model folder that cannot be read: the job would stop on it too
        return None, None  # a hub id, offline without a cached config: the estimate is optional
    padding = pad_token(tokenizer, cfg.model.pad_token) or f"padding with {tokenizer.pad_token!r}"
    family = check_model(cfg.model, cfg.data.max_length, tokenizer, mc)
    mask = mask_setting(cfg.model.attention_mask, family)
    about = {"family": family.name, "pooling": family.pooling, "padding": padding,
             "attention_mask": mask if mask == cfg.model.attention_mask else f"{mask} (its own mask handling)"}
    try:
        with torch.device("meta"):
            return about, model_shape(AutoModelForSequenceClassification.from_config(
                mc, trust_remote_code=cfg.model.trust_remote_code))
    except Exception:  # a config that transformers cannot build here: the estimate is optional
        return about, None


def plan(cfg: Config, launch_config: Optional[str] = None, nodes: Optional[int] = None,
         gpus_per_node: Optional[int] = None, env=os.environ) -> dict:
    t, d = cfg.train, cfg.data
    check_graphs_config(cfg)
    world = world_from(read_launch_config(launch_config), nodes, gpus_per_node, env)

    ds_resolved = None
    if world.deepspeed_json:
        written = read_deepspeed_json(world.deepspeed_json)
        ds_resolved = fill_deepspeed(json.loads(json.dumps(written)),
                                     deepspeed_values(written, world.deepspeed_json, t, world.processes))
        for key in ("bf16", "fp16"):
            if isinstance(ds_resolved.get(key), dict) and ds_resolved[key].get("enabled") == "auto":
                ds_resolved[key] = {**ds_resolved[key], "enabled": world.mixed_precision == key}

    n_train, train_text = split_size(cfg, d.train_split, d.train_samples)
    n_eval, eval_text = split_size(cfg, d.eval_split, d.eval_samples)
    schedule = Schedule.of(t, n_train, world.processes)  # what a fresh run of this config does
    schedule.check_cadence(t)
    folder = RunFolder(t.output_dir)
    start, checkpoint = folder.decide(cfg)
    resume = None
    if start == "resume":  # what loading it on this launch does; refused here as `train` would refuse it
        saved = read_progress(checkpoint)
        resume = resume_mode(saved.world_size, saved.sharding, world.processes,
                             None if world.parallelism == "DDP" else world.parallelism)

    flops = None
    about, shape = model_offline(cfg)
    if shape is not None:
        params, non_embedding, layers, hidden = shape
        per_token = training_flops_per_token(non_embedding, layers, hidden, d.max_length)
        flops = {"parameters": params, "non_embedding_parameters": non_embedding, "flops_per_token": per_token,
                 "training_flops_upper_bound": flops_upper_bound(per_token, schedule.total_steps,
                                                                 schedule.global_batch, d.max_length)}

    return {
        "world": world, "global_batch": schedule.global_batch, "train_examples": train_text, "eval_examples": eval_text,
        "steps_per_epoch": schedule.steps_per_epoch, "total_steps": schedule.total_steps,
        "epochs": schedule.total_steps / schedule.steps_per_epoch, "warmup": schedule.warmup, "deepspeed": ds_resolved, "flops": flops, "start": start, "checkpoint": checkpoint,
        "resume": resume,
        "lock": folder.lock_status(), "model": about,
    }


def describe(cfg: Config, p: dict) -> str:
    t, w = cfg.train, p["world"]
    eval_at = "end of every epoch" if t.eval_every == "epoch" else f"every {t.eval_every} steps"
    save_at = {None: "only when stopped by a signal", "epoch": "end of every epoch"}.get(
        t.save_every, f"every {t.save_every} steps")
    start = {"fresh": "fresh start", "finished": "already finished (nothing to do)"}.get(
        p["start"], f"resume from {p['checkpoint']} ({p['resume']})")
    lines = [
        f"world size      {w.nodes} node(s) x {w.processes // w.nodes} process(es) = {w.processes} processes  [{w.source}]",
        f"precision       {w.mixed_precision}" + (f" (from {w.deepspeed_json})" if w.deepspeed_json else " (from the launch config)"),
        f"parallelism     {w.parallelism if w.processes > 1 or w.parallelism != 'DDP' else 'one process'}",
        f"batch           {t.per_device_batch_size} per device x {t.grad_accum_steps} accumulation x {w.processes} = {p['global_batch']} per optimizer step",
        f"data            {cfg.data.dataset}: train {p['train_examples']}, eval {p['eval_examples']}, max_length {cfg.data.max_length}",
        f"steps           {p['steps_per_epoch']} per epoch, {p['total_steps']} in total ({p['epochs']:.2f} epochs), warmup {p['warmup']}"
        + (" (at least: with data.truncation=chunks a long text trains as several windows)"
           if cfg.data.truncation == "chunks" and t.chunk_loss == "windows" and t.max_steps is None else ""),
        f"evaluation      {eval_at} and at the end",
        f"checkpoints     {save_at}, keep {t.keep_last}" + (f", best by {t.best_metric}" if t.best_metric else ""),
        f"output          {t.output_dir}: {start}",
        f"lock            {p['lock']}",
    ]
    if p["model"]:
        m = p["model"]
        lines.append(f"family          {m['family']}: pools {m['pooling']}; attention mask {m['attention_mask']}; "
                     f"{m['padding']}")
    if p["flops"]:
        f = p["flops"]
        lines.append(f"model           {f['parameters'] / 1e6:.1f}M parameters ({f['non_embedding_parameters'] / 1e6:.1f}M non-embedding)")
        lines.append(f"training FLOPs  <= {f['training_flops_upper_bound']:.3e} ({f['flops_per_token'] / 1e9:.3f} GFLOP per token, every example at max_length)")
    else:
        lines.append("training FLOPs  unknown (the model's config is not available offline)")
    if p["deepspeed"] is not None:
        lines.append("deepspeed       " + json.dumps(p["deepspeed"], indent=2).replace("\n", "\n                "))
    return "\n".join(lines)


def get_value(cfg: Config, key: str) -> str:
    section, _, name = key.partition(".")
    values = cfg.to_dict().get(section)
    if not isinstance(values, dict) or name not in values:
        raise BadInput(f"--get {key}: no such config key")
    value = values[name]
    return "" if value is None else str(value)
