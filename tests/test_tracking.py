"""What a run reports: the throughput meter's arithmetic, the tracker check, the compute-dtype probe."""

from types import SimpleNamespace

import pytest
import torch

from harness.errors import BadInput
from harness.tracking import DtypeProbe, Throughput, trackers


class OneProcess(SimpleNamespace):
    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor


def test_throughput_window_sums_counts_and_restarts(monkeypatch):
    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr("harness.tracking.time.perf_counter", lambda: next(clock))
    meter = Throughput(OneProcess(device=torch.device("cpu"), num_processes=1), lambda seq: 1000.0 * seq, 1e6)
    for loss, mask in ((0.5, [[1, 1, 0, 0], [1, 1, 1, 1]]), (0.7, [[1, 0, 0, 0], [1, 1, 1, 0]])):
        meter.count({"labels": torch.zeros(2), "attention_mask": torch.tensor(mask)})
        meter.add_loss(torch.tensor(loss))
    r = meter.read()
    assert r["train/loss"] == pytest.approx(0.6)
    assert r["train/samples_per_s"] == pytest.approx(4 / 2) and r["train/tokens_per_s"] == pytest.approx(10 / 2)
    assert r["train/padding_fraction"] == pytest.approx(1 - 10 / 16)
    assert r["train/mfu"] == pytest.approx(1000.0 * 4 * 10 / 2 / 1e6)  # FLOPs at the padded length 16/4
    assert meter.samples == 0 and float(meter.loss_sum) == 0.0, "the next window starts empty"


def test_a_tracker_that_is_not_installed_is_bad_input():
    assert trackers("none") == [] and trackers(["tensorboard"]) == ["tensorboard"]
    pytest.importorskip("tensorboard")
    import importlib.util

    if importlib.util.find_spec("aim") is None:
        with pytest.raises(BadInput, match="train.report_to=aim: the package 'aim' is not installed"):
            trackers(["tensorboard", "aim"])


def test_dtype_probe_reads_the_last_linear_layer_inside_autocast():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    probe = DtypeProbe(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(3, 4)).float()  # what Accelerate hands back is fp32 again
    assert probe.remove() == "bfloat16"
    model(torch.randn(3, 4))
    assert probe.dtype == torch.bfloat16, "removed: later forwards do not change it"


def test_sync_watch_counts_synchronising_operations_not_the_prototype_notice():
    """torch's sync debug mode announces itself once with a warning that also says "Synchronization";
    counting it would report one sync on a clean loop. Messages as torch 2.11 words them."""
    from harness.tracking import is_sync_warning

    assert is_sync_warning("called a synchronizing CUDA operation (Triggered internally at c10/cuda/CUDAFunctions.cpp:154.)")
    assert not is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect all "
                               "synchronizing operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1003.)")


def test_a_metrics_write_that_fails_stops_the_run_with_write_failed(tmp_path):
    from types import SimpleNamespace

    from harness.errors import WriteFailed
    from harness.tracking import MetricsLog

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, log_with=[])
    run = SimpleNamespace(metrics=tmp_path / "metrics.jsonl", root=tmp_path)
    log = MetricsLog(accelerator, run, None, resume_step=None)
    log.log(1, {"train/loss": 0.5})
    run.metrics.unlink()
    run.metrics.mkdir()  # the write now fails as a full disk's would, with an OSError
    with pytest.raises(WriteFailed, match=rf"could not write {run.metrics}: \[Errno 21\] Is a directory"):
        log.log(2, {"train/loss": 0.4})


def test_a_tracker_write_that_fails_stops_the_run_with_write_failed(tmp_path):
    """TensorBoard's writer thread hands a failed write back at the next log call, as an OSError."""
    import errno
    from types import SimpleNamespace

    from harness.errors import WriteFailed
    from harness.tracking import MetricsLog

    def full_disk(values, step):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "tensorboard" / "events.out"))

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, log_with=["tensorboard"],
                                  init_trackers=lambda *a, **k: None, log=full_disk)
    cfg = SimpleNamespace(to_dict=lambda: {"train": {"lr": 1e-3}})
    log = MetricsLog(accelerator, SimpleNamespace(metrics=tmp_path / "metrics.jsonl", root=tmp_path), cfg, None)
    with pytest.raises(WriteFailed, match=r"could not write .*events.out: \[Errno 28\] No space left on device"):
        log.log(1, {"train/loss": 0.5})

