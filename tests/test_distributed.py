"""harness.distributed on its own: DeepSpeed value filling, what a resume does, FSDP2 units, stop flag."""

import signal
from types import SimpleNamespace

import pytest

from harness.recipes import load_config
from harness.distributed import configure_fsdp, resume_mode, deepspeed_values, fill_deepspeed
from harness.guards import StopFlag
from harness.errors import BadInput


def test_deepspeed_values_fill_auto_and_refuse_contradictions():
    t = load_config(None, ["train.per_device_batch_size=8", "train.grad_accum_steps=2"]).train
    values = deepspeed_values({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}, "z.json", t, world_size=4)
    assert values["train_batch_size"] == 64 and values["zero_optimization.stage3_gather_16bit_weights_on_model_save"]
    config = fill_deepspeed({"zero_optimization": {"stage": 3}}, values)
    assert config["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    with pytest.raises(BadInput, match="train_batch_size=32 contradicts"):
        deepspeed_values({"train_batch_size": 32}, "z.json", t, world_size=4)
    with pytest.raises(BadInput, match="defines its own 'optimizer'"):
        deepspeed_values({"optimizer": {}}, "z.json", t, world_size=4)


@pytest.mark.parametrize("saved, saved_ws, now, ws, expected", [
    (None, 2, None, 2, "same world size"),
    (None, 2, None, 1, "resharded from 2 to 1 processes"),
    ("FSDP2 (full sharding)", 2, "FSDP2 (gradient/optimizer sharding)", 4, "resharded from 2 to 4 processes"),
    ("DeepSpeed ZeRO-2", 2, "DeepSpeed ZeRO-1", 2, "same world size"),  # the same partitions on disk
    ("DeepSpeed ZeRO-3 (offload: optimizer, param)", 4, "DeepSpeed ZeRO-3", 4, "same world size"),
    ("DeepSpeed ZeRO-2", 2, "DeepSpeed ZeRO-1", 1,
     "resharded from 2 to 1 processes through DeepSpeed's universal checkpoint"),
    ("FSDP2 (full sharding)", 2, None, 1, "converted from FSDP2 (full sharding) on 2 processes to one process"),
    (None, 2, "FSDP2 (full sharding, CPU offload)", 2,
     "converted from DDP on 2 processes to FSDP2 (full sharding, CPU offload) on 2 processes"),
    ("DeepSpeed ZeRO-2", 2, "DeepSpeed ZeRO-3", 4,
     "converted from DeepSpeed ZeRO-2 on 2 processes to DeepSpeed ZeRO-3 on 4 processes"),
    (None, 1, "DeepSpeed ZeRO-3", 2, "converted from one process to DeepSpeed ZeRO-3 on 2 processes"),
])
def test_what_a_resume_does_from_the_parallelism_and_world_size_that_wrote_it(saved, saved_ws, now, ws, expected):
    assert resume_mode(saved_ws, saved, ws, now) == expected


@pytest.mark.parametrize("saved, now", [("FSDP1 (full sharding)", None), (None, "FSDP1 (full sharding)"),
                                        ("FSDP1 (full sharding)", "FSDP2 (full sharding)")])
def test_a_layout_harness_cannot_read_or_write_is_refused_in_one_line(saved, now):
    with pytest.raises(BadInput, match=r"^checkpoint was written by 2 processes under .*; harness resumes .* state "
                                       r"only under .* on 2 processes, not under .*: resume it with the launch config "
                                       r"that wrote it$") as e:
        resume_mode(2, saved, 2, now)
    assert "\n" not in str(e.value)


def test_fsdp_units_are_the_layers_not_the_module_holding_the_embeddings(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=None)
    configure_fsdp(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), model)
    assert set(model._no_split_modules) == {"BertEmbeddings", "BertLayer"} and plugin.transformer_cls_names_to_wrap == ["BertLayer"]
    named = SimpleNamespace(transformer_cls_names_to_wrap=["MyLayer"])
    configure_fsdp(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=named)), model)
    assert named.transformer_cls_names_to_wrap == ["MyLayer"], "a launch config's own choice is kept"


def test_one_process_stop_flag_answers_at_once_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    flag = StopFlag().install()
    assert not flag.should_stop()
    signal.raise_signal(signal.SIGUSR1)
    assert flag.should_stop() and flag.received == signal.SIGUSR1
    flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before
