"""The benchmarks' shared parts: children that see their parent's packages, assets, timed windows, the tables."""

import os

import pytest

from benchmarks import common
from benchmarks.common import REPO, child_env


def test_child_pythonpath_extends_the_parents_never_replaces_it(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", "/opt/other"]))
    path = child_env()["PYTHONPATH"].split(os.pathsep)
    assert path == [str(REPO), "/tmp/site", "/opt/other"]
    monkeypatch.delenv("PYTHONPATH")
    assert child_env()["PYTHONPATH"] == str(REPO)


def test_gpu_sh_summary_is_one_table_with_ratios_to_the_seed_and_the_trainer_at_the_same_batch():
    from benchmarks.gpu_bench import summary

    row = dict(tokens_per_s=1000.0, padding_fraction=0.1, peak_mem_mb=3000.0)
    throughput = {"args": {"batch": 8}, "median": {"seed": {**row, "samples_per_s": 100.0},
                                                    "trainer": {**row, "samples_per_s": 50.0},
                                                    "harness": {**row, "samples_per_s": 250.0}}}
    bench = {"results": [{**row, "batch": 8, "variant": "default", "samples_per_s": 400.0, "mfu": 0.02,
                          "first_steps_s": 3.5},
                         {**row, "batch": 128, "variant": "default", "samples_per_s": 1600.0, "mfu": 0.25,
                          "first_steps_s": 4.0}]}
    lines = summary(throughput, bench).splitlines()
    assert len(lines) == 2 + 5 and all(line.count("|") == 12 for line in lines)
    cells = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
             for line in lines[2:]}
    assert cells["8", "harness"][8:11] == ["2.50x", "5.00x", "5.0"]  # 75,000 reviews at 250/s: 5.0 min
    assert cells["8", "harness default"][4] == "2.0%" and cells["8", "harness default"][8:10] == ["4.00x", "8.00x"]
    assert cells["128", "harness default"][8:10] == ["-", "-"]  # no seed or Trainer ran at batch 128
    assert summary(None, bench).count("\n") == 3  # gpu_bench's rows alone


def test_a_childs_notes_reach_the_parent(tmp_path, monkeypatch, capsys):
    """Whether a run really captured its CUDA graphs (or compiled, or skipped them) is in its own output, which the
    benchmark parent otherwise drops: those lines come back in the RESULT and are printed under the system's name."""
    child = tmp_path / "fake_child.py"
    child.write_text("print('step 10: loss 0.7')\n"
                     "print('CUDA graphs: 3 captured (one per batch shape) in 0.20 s, 57 step(s) replayed, 6 run eagerly')\n"
                     "print('torch.compile: 1 graph(s) compiled, 0 graph break(s), CUDA graphs skipped for 0 compiled graph(s)')\n"
                     "print('RESULT {\"samples_per_s\": 1.0}')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    result = common.run_child("fake_child", [], "harness_step_graphs")
    assert result["samples_per_s"] == 1.0 and len(result["notes"]) == 2 and result["notes"][0].startswith("CUDA graphs: 3 captured")
    out = capsys.readouterr().out
    assert "harness_step_graphs: CUDA graphs: 3 captured" in out and "step 10" not in out


def test_throughput_medians_take_the_numbers_and_keep_the_notes():
    from benchmarks.throughput import medians

    rounds = [{"samples_per_s": 4.0, "tokens_per_s": 100, "notes": ["first step in 1.0 s"]},
              {"samples_per_s": 6.0, "tokens_per_s": 300, "notes": ["first step in 0.5 s"]}]
    assert medians(rounds) == {"samples_per_s": 5.0, "tokens_per_s": 200, "notes": ["first step in 0.5 s"]}


def test_gpu_bench_rates_are_totals_over_the_timed_windows_not_medians_of_each_metric():
    """Windows of 10 and 5 steps after a warm-up window: samples and tokens over the span's time, padding over its
    tokens, MFU weighted by time; the warm-up window and the steps it holds are left out."""
    import pytest

    from benchmarks.common import timed_windows

    def window(step, samples_per_s, tokens_per_s, padding, mfu):
        return {"step": step, "train/samples_per_s": samples_per_s, "train/tokens_per_s": tokens_per_s,
                "train/padding_fraction": padding, "train/mfu": mfu}

    # batch 8: the second window is 10 steps in 2.0 s (80 samples, 32,000 real tokens, no padding),
    # the third 5 steps in 0.8 s (40 samples, 8,000 real tokens of 16,000 computed)
    records = [window(10, 80.0, 8000.0, 0.2, 0.1), window(20, 40.0, 16000.0, 0.0, 0.2), window(25, 50.0, 10000.0, 0.5, 0.3)]
    t = timed_windows(records, batch=8, warmup=10)
    assert t["steps"] == 15 and t["seconds"] == pytest.approx(2.8)
    assert t["samples_per_s"] == pytest.approx(120 / 2.8) and t["tokens_per_s"] == pytest.approx(40000 / 2.8)
    assert t["padding_fraction"] == pytest.approx(1 - 40000 / 48000)
    assert t["mfu"] == pytest.approx((0.2 * 2.0 + 0.3 * 0.8) / 2.8)
    with pytest.raises(SystemExit, match="no log window after step 25"):
        timed_windows(records, batch=8, warmup=25)


def test_gpu_profile_sorts_kernels_into_kinds_by_their_names():
    """gpu_profile's table of kernel time by kind, on kernel names as CUDA builds of torch 2.11 call them: the
    attention kernels built on CUTLASS count as attention, copies and GELU run in elementwise kernels apart."""
    from benchmarks.gpu_profile import kernel_time_by_kind, kind_of

    names = {
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NTN": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": "matmul",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80>::Params)": "attention",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8>>(Flash_bwd_params)": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*, ...)": "attention",
        "triton_per_fused_add_native_dropout_native_layer_norm_0": "compiled (Triton)",
        "triton_tem_fused_mm_1": "matmul",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float, ...)": "layer norm",
        "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float, unsigned int, 1, 4, bool>(...)": "dropout",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}>": "elementwise",
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>": "memory copy / set",
        "Memcpy DtoH (Device -> Pageable)": "memory copy / set",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (ADAM_MODE)1, false>>": "optimizer",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>": "softmax",
        "void at::native::embedding_backward_feature_kernel<c10::BFloat16, float, long>": "embedding",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::sum_functor>>>": "reduction",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "other",
    }
    assert {name: kind_of(name) for name in names} == names
    rows = kernel_time_by_kind([("nvjet_a", 600.0), ("flash_fwd", 200.0), ("nvjet_b", 100.0), ("mystery", 100.0)])
    assert [kind for kind, _, _ in rows] == ["matmul", "attention", "other"]  # the largest first
    assert [x for _, us, share in rows for x in (us, share)] == pytest.approx([700.0, 0.7, 200.0, 0.2, 100.0, 0.1])


def test_gpu_profile_counts_kernels_not_the_step_annotations_spanning_them():
    """torch.profiler's `ProfilerStep*` range has a GPU side as long as the step's kernels: counted as a kernel it
    doubled the kernel time per step. CPU operators carry no kernel time of their own."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.gpu_profile import kernel_times

    def event(key, device, us, annotation=False):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=us, is_user_annotation=annotation)

    events = [event("ProfilerStep*", DeviceType.CUDA, 1900.0, annotation=True), event("nvjet_a", DeviceType.CUDA, 600.0),
              event("aten::mm", DeviceType.CPU, 100.0), event("flash_fwd", DeviceType.CUDA, 200.0),
              event("ProfilerStep#3", DeviceType.CUDA, 80.0)]  # a torch that does not mark annotations
    assert kernel_times(events) == [("nvjet_a", 600.0), ("flash_fwd", 200.0)]


def test_assets_are_a_bert_classifier_and_reviews_of_imdb_lengths(tmp_path):
    """common.build_assets: a model transformers loads, a tokenizer whose words are one token each, and reviews
    whose lengths are review_word_counts' (median near IMDb's 237 tokens); a second call reuses them."""
    import numpy as np
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    shape = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    model_dir, data = common.build_assets(tmp_path, 400, model=shape)
    assert AutoModelForSequenceClassification.from_pretrained(model_dir).config.hidden_size == 8
    train = pd.read_parquet(data / "train.parquet")
    words = train["text"].str.split().str.len().to_numpy()
    assert len(train) == 400 and len(pd.read_parquet(data / "test.parquet")) == 512
    assert (words == common.review_word_counts(np.random.default_rng(0), 400)).all()
    assert 180 < np.median(words) < 300 and set(train["label"]) == {0, 1}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer(train["text"][0], add_special_tokens=False)["input_ids"]) == words[0]
    (data / "marker").write_text("kept")
    assert common.reuse_or_build_assets(tmp_path, 400) == (model_dir, data) and (data / "marker").is_file()
