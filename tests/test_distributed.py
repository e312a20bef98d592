"""harness.distributed on its own: DeepSpeed value filling, the sharded world-size rule, FSDP2 units, stop flag."""

import signal
from types import SimpleNamespace

import pytest

from harness.recipes import load_config
from harness.distributed import check_world_size, configure_fsdp, deepspeed_values, fill_deepspeed
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


def test_a_sharded_checkpoint_resumes_only_on_its_world_size():
    plain = SimpleNamespace(num_processes=1, state=SimpleNamespace(deepspeed_plugin=None), distributed_type=None)
    check_world_size(2, None, plain)  # DDP: any world size
    with pytest.raises(BadInput, match=r"written by 2 processes and FSDP2 \(full sharding\) state is sharded per rank; "
                                       r"resume it on 2 processes \(now 1\)"):
        check_world_size(2, "FSDP2 (full sharding)", plain)
    check_world_size(1, "FSDP2 (full sharding)", plain)


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
