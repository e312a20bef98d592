"""The run's arithmetic, once: what plan prints is what the run does."""

import pytest

from harness.recipes import load_config
from harness.errors import BadInput
from harness.schedule import Schedule, eval_batch_size, training_flops_per_token


def train_cfg(*overrides):
    return load_config(None, list(overrides)).train


def test_fresh_schedule_of_the_reference_recipe_on_16_processes():
    s = Schedule.of(train_cfg("train.epochs=3", "train.warmup_steps=500"), num_examples=25_000, world_size=16)
    assert (s.global_batch, s.steps_per_epoch, s.total_steps, s.warmup) == (128, 196, 588, 500)


def test_a_resume_on_another_world_size_continues_from_the_same_sample():
    t = train_cfg("train.epochs=2", "train.per_device_batch_size=4")
    # 2 ranks x 4 consumed 40 of 100 examples in 5 steps; 1 rank finishes epoch 0 (15 steps) then epoch 1 (25)
    s = Schedule.of(t, num_examples=100, world_size=1, step=5, epoch=0, position=40)
    assert (s.global_batch, s.steps_per_epoch, s.total_steps) == (4, 25, 5 + 15 + 25)
    assert Schedule.of(train_cfg("train.max_steps=7"), 100, 2, step=5).total_steps == 7


def test_impossible_schedules_are_refused_naming_the_numbers():
    with pytest.raises(BadInput, match=r"global batch 64 \(per-device 8 x accumulation 2 x 4 processes\) is larger than the training set \(50\)"):
        Schedule.of(train_cfg("train.grad_accum_steps=2"), 50, 4)
    with pytest.raises(BadInput, match=r"train.warmup_steps=40 is longer than the run \(13 optimizer steps\)"):
        Schedule.of(train_cfg("train.epochs=1", "train.warmup_steps=40"), 100, 1)
    with pytest.raises(BadInput, match=r"train.save_every=99 is longer than the run"):
        Schedule.of(train_cfg("train.epochs=1", "train.save_every=99"), 100, 1).check_cadence(train_cfg("train.save_every=99"))


def test_eval_batch_and_flops():
    assert eval_batch_size(train_cfg("train.per_device_batch_size=8")) == 16
    assert eval_batch_size(train_cfg("train.eval_batch_size=5")) == 5
    # bert-base: 85.6M non-embedding parameters, 12 layers of 768 at 512 tokens
    assert training_flops_per_token(85_600_000, 12, 768, 512) == 6 * 85_600_000 + 12 * 12 * 768 * 512 == 570_223_104


@pytest.mark.parametrize("length", [128, 512])
def test_mfu_counts_the_flops_torch_counts_in_a_bert_base_training_step(length):
    """train/mfu's numerator (flops_per_token x real tokens) against torch's own FLOP counter over one forward and
    backward of the bert-base shape (on the meta device: shapes only, no weights, no compute). What the formula
    counts that the step does not: the pooler and biases as if every token used them (0.8% of the step)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertForSequenceClassification

    from harness.modeling import flops_per_token

    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(attn_implementation="eager"))  # attention as matmuls, counted
        ids, labels = torch.zeros(4, length, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=labels).loss.backward()
    assert counter.get_total_flops() / (flops_per_token(model)(length) * 4 * length) == pytest.approx(0.992, abs=0.002)
