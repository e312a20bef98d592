"""Checking pickles harness did not necessarily write, before any library unpickles them: only known globals pass.

A pickle runs code through the callables it names (GLOBAL, STACK_GLOBAL, INST, the extension registry) and then
calls. `pickle_globals` lists those names by reading the opcodes, without unpickling anything; `check_pickles`
refuses a folder where any pickle (a plain one, or the data.pkl of a torch.save zip) names a global outside
ALLOWED, or names one it cannot resolve to a literal. DeepSpeed unpickles its partitions in full and
torch.distributed.checkpoint its metadata: this check is what stands before them.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

from harness.errors import BadInput

# The globals of every file harness's checkpoints hold (model, optimizer, scheduler and RNG states under DDP,
# DeepSpeed ZeRO 1-3 and FSDP2): tensor rebuilding, containers, numpy's RNG state, and the plain records of
# DeepSpeed and torch.distributed.checkpoint. Nothing here executes anything but building data.
ALLOWED = frozenset({
    "collections.OrderedDict", "collections.defaultdict", "_codecs.encode", "builtins.set", "builtins.frozenset", "builtins.slice",
    "builtins.bytearray", "builtins.complex",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_wrapper_subclass", "torch._tensor._rebuild_from_type_v2", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_nested_tensor",
    "torch.Size", "torch.device", "torch.dtype", "torch.nn.parameter.Parameter", "torch.Tensor",
    *(f"torch.{t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte",
                                     "Bool", "ComplexFloat", "ComplexDouble", "Untyped")),
    *(f"torch.{d}" for d in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                             "bool", "complex64", "complex128")),
    "torch.storage.UntypedStorage", "torch.storage.TypedStorage", "torch.serialization._get_layout",
    "torch.strided", "torch.sparse_coo", "torch.channels_last", "torch.contiguous_format", "torch.preserve_format",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    *(f"numpy.dtypes.{t}DType" for t in ("UInt32", "UInt64", "Int64", "Int32", "Float64", "Float32", "Bool")),
    # DeepSpeed's optimizer partitions: plain records
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    # torch.distributed.checkpoint's .metadata (FSDP2): dataclasses that describe the shards
    *(f"torch.distributed.checkpoint.metadata.{c}" for c in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta")),
    "torch.distributed.checkpoint.filesystem._StorageInfo", "pathlib.PosixPath", "pathlib.WindowsPath",
})


def _strings_and_globals(data: bytes):
    """Yield each global a pickle names, as `module.name`, or None where its name is not a literal."""
    memo: dict[int, object] = {}
    stack: list[object] = []  # the recent pushes, strings where they are literals, None where not
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, qualname = arg.split(" ", 1)
            yield f"{module}.{qualname}"
            stack.append(None)
        elif name == "STACK_GLOBAL":
            module, qualname = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
            yield f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else None
            stack.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            yield None  # the copyreg extension registry: a global by number
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                      "STRING"):
            stack.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
            continue
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else None
            continue
        elif name in ("FRAME", "PROTO", "STOP"):  # framing: nothing pushed
            continue
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        else:
            stack.append(None)
        del stack[:-2]


def pickle_globals(path: Path) -> list[str | None]:
    """The globals a pickle file names: of a torch.save zip, its data.pkl's (and any other .pkl inside)."""
    raw = Path(path).read_bytes()
    streams = []
    if zipfile.is_zipfile(io.BytesIO(raw)):
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            streams = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    else:
        streams = [raw]
    found = []
    for data in streams:
        try:
            found.extend(_strings_and_globals(data))
        except Exception:  # not a pickle at all, or cut short: nothing a library should unpickle either
            found.append(UNREADABLE)
    return found


UNREADABLE = "<not a readable pickle>"


PICKLE_SUFFIXES = (".pt", ".bin", ".pkl", ".pth", ".metadata")


def is_pickle(path: Path) -> bool:
    """A file harness or the libraries it drives pickle: by suffix, and torch.distributed.checkpoint's `.metadata`."""
    return path.is_file() and (path.suffix in PICKLE_SUFFIXES or path.name == ".metadata")


def check_pickles(folder: Path, what: str) -> None:
    """Refuse `folder` (BadInput, one line naming the file) where a pickle in it names a global outside ALLOWED."""
    for path in sorted(Path(folder).rglob("*")):
        if not is_pickle(path):
            continue
        found = pickle_globals(path)
        if UNREADABLE in found:
            raise BadInput(f"{what} {folder} cannot be loaded: {path.relative_to(folder)} is not a pickle harness "
                           f"can read (cut short or altered)")
        unknown = sorted({g or "a global it does not name plainly" for g in found if g not in ALLOWED})
        if unknown:
            raise BadInput(f"{what} {folder} cannot be loaded: {path.relative_to(folder)} would run code when loaded "
                           f"({', '.join(unknown[:3])}); harness loads no such file: it was not written by harness")
