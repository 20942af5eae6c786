"""Checkpoint loading shared by every model: safe unpickling, state-dict extraction, strict key matching.

Official checkpoints are plain `torch.save` pickles. Some carry Python objects besides tensors (MAR/TransDiff store
an `argparse.Namespace` under `args`; the D-AR tokenizer file pickles a `config_util.Config`). We never execute
arbitrary pickles: loading goes through torch's `weights_only` unpickler, with a short allow-list of stand-in
classes that rebuild those objects as plain attribute bags.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


class PickledObject:
    """Stand-in for a pickled config object: keeps its state as attributes, never runs its code."""

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def to_dict(self) -> dict:
        return {k: (v.to_dict() if isinstance(v, PickledObject) else v) for k, v in self.__dict__.items()}

    def __repr__(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}({self.to_dict()!r})"


def _stand_in(module: str, name: str) -> type:
    return type(name, (PickledObject,), {"__module__": module, "__qualname__": name})


# Python objects found in the official checkpoints, rebuilt as inert stand-ins.
_STAND_INS = [_stand_in("config_util", "Config"), _stand_in("utils.config_util", "Config")]
_SAFE_CLASSES = [argparse.Namespace]


# Globals a torch.distributed.checkpoint `.metadata` pickle may name: its own dataclasses/enums and the torch values
# they hold. `pickle.load` (what DCP's FileSystemReader uses) would import and call anything.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}  # fmt: skip


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):  # torch.float32, ...
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not a distributed-checkpoint metadata class")


def read_dcp_metadata(folder: str | os.PathLike) -> object:
    """The `.metadata` of a torch.distributed.checkpoint folder, unpickled with an allow-list of DCP's metadata
    classes (never arbitrary code); `CheckpointError` naming the file for anything else."""
    path = os.path.join(os.fspath(folder), ".metadata")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"distributed checkpoint {os.fspath(folder)!r} has no '.metadata' file: it was not finished; "
            "use an earlier one"
        )
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            meta = _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"distributed checkpoint metadata {path!r} contains a Python object that ardiff refuses to unpickle: "
            f"{e}. Only torch.distributed.checkpoint metadata classes are loaded (never arbitrary code)."
        ) from e
    except (EOFError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"distributed checkpoint metadata {path!r} is truncated or corrupt ({e})") from e
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path!r} is not torch.distributed.checkpoint metadata (got {type(meta).__name__})")
    return meta


def check_distributed_checkpoint(folder: str | os.PathLike) -> None:
    """Vet a distributed (FSDP2) checkpoint folder before torch.distributed.checkpoint reads it.

    DCP unpickles `.metadata` with plain `pickle` and the non-tensor items of the `.distcp` files with
    `torch.load(weights_only=False)`: here the metadata is read with an allow-list and every such item with the
    safe loader, so a crafted folder is refused (`CheckpointError` naming the file) before any code could run.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = os.path.realpath(os.fspath(folder))
    meta = read_dcp_metadata(folder)
    byte_keys = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (meta.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        file = os.path.realpath(os.path.join(folder, str(rel)))
        if not isinstance(rel, str) or os.path.dirname(file) != folder:
            raise CheckpointError(f"distributed checkpoint {folder!r}: item {index.fqn!r} points outside the folder")
        if not os.path.isfile(file):
            raise CheckpointError(f"distributed checkpoint {folder!r} lacks {rel!r}: it was not finished or copied")
        if index.fqn not in byte_keys:
            continue  # tensors: DCP reads them with weights_only=True
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{file!r}: transformed (e.g. compressed) non-tensor items are not supported")
        with open(file, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            with torch.serialization.safe_globals([*_STAND_INS, *_SAFE_CLASSES]):
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"distributed checkpoint file {file!r} (item {index.fqn!r}) contains a Python object that ardiff "
                f"refuses to unpickle: {e}"
            ) from e
        except (RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(f"distributed checkpoint file {file!r} is truncated or corrupt ({e})") from e
    extra = os.path.join(folder, "meta.pt")  # Lightning's non-tensor state beside the DCP files
    if os.path.isfile(extra):
        safe_torch_load(extra)


CHECKSUM_SUFFIX = ".sha256"
SKIP_CHECKSUM_ENV = "ARDIFF_SKIP_CHECKSUM"  # =1: load a checkpoint whose sha256 does not match (at your own risk)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksum(path: str | os.PathLike) -> None:
    """Write `<path>.sha256` (`sha256sum` format) beside a checkpoint file, atomically."""
    path = os.fspath(path)
    tmp = path + CHECKSUM_SUFFIX + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{file_sha256(path)}  {os.path.basename(path)}\n")
    os.replace(tmp, path + CHECKSUM_SUFFIX)


def verify_checksum(path: str | os.PathLike) -> None:
    """Compare a checkpoint with the `<path>.sha256` written beside it (no file: nothing to check)."""
    path = os.fspath(path)
    record = path + CHECKSUM_SUFFIX
    if not os.path.isfile(record) or os.environ.get(SKIP_CHECKSUM_ENV) == "1":
        return
    with open(record) as f:
        expected = f.read().split()[0] if os.path.getsize(record) else ""
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path!r} does not match its checksum {record!r} (sha256 {actual[:16]}... != "
            f"{expected[:16]}...): the file was corrupted after it was written; use an earlier one, or set "
            f"{SKIP_CHECKSUM_ENV}=1 to load it anyway"
        )


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Fail early, naming the file, if `path` is missing, empty, cut off, or an incomplete or unsafe distributed
    checkpoint."""
    path = os.fspath(path)
    if os.path.isdir(path):  # a distributed (FSDP2) checkpoint folder
        check_distributed_checkpoint(path)
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} (check the path, or the ckpt/init_from setting)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): the write was interrupted; use an earlier one")
    if not zipfile.is_zipfile(path):  # torch.save files are zip archives; a cut-off one loses its directory
        raise CheckpointError(
            f"checkpoint {path!r} is truncated or not a torch.save file (no zip directory); use an earlier one"
        )
    verify_checksum(path)


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """Load a `torch.save` file without executing arbitrary code.

    Tensors, containers, numbers, `argparse.Namespace` and the official `config_util.Config` (as a
    `PickledObject`) are allowed; any other global is refused with an error naming it.
    """
    path = os.fspath(path)
    check_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals([*_STAND_INS, *_SAFE_CLASSES]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path!r} contains a Python object that ardiff refuses to unpickle: {e}. "
            "Only tensors, containers and known config objects are loaded (never arbitrary code)."
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt ({e}); use an earlier one") from e


_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def extract_state_dict(
    ckpt: object, prefer: Iterable[str] = ("model_ema", "ema", "model", "state_dict")
) -> dict[str, torch.Tensor]:
    """Pick the weights out of a checkpoint dict: the first key of `prefer` present, or the dict itself.

    `module.` / `_orig_mod.` prefixes (DDP, torch.compile) are stripped.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"expected a checkpoint dict, got {type(ckpt).__name__}")
    for key in prefer:
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return _strip_prefixes(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _strip_prefixes(ckpt)
    raise CheckpointError(f"no state dict found under any of {list(prefer)}; top-level keys are {sorted(ckpt)[:20]}")


@dataclass
class LoadReport:
    """What `load_state_dict_strict` loaded, and what it could not."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, file shape, model shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        def block(title: str, items: list) -> list[str]:
            if not items:
                return []
            lines = [f"  {title} ({len(items)}):"] + [f"    {x}" for x in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
            return lines

        shapes = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
        return "\n".join(
            [f"  loaded {len(self.loaded)} tensors"]
            + block("missing from the file", self.missing)
            + block("unexpected in the file", self.unexpected)
            + block("shape mismatch", shapes)
        )


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    strict: bool = True,
    assign: bool = False,
) -> LoadReport:
    """Load `state_dict` into `module`, checking every key and shape first.

    strict=True: any missing, unexpected or shape-mismatched key raises `CheckpointError` listing them all.
    strict=False: loads the tensors that fit and returns the report of what did not (for fine-tuning).
    """
    own = module.state_dict()
    report = LoadReport()
    fitting = {}
    for k, v in state_dict.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            fitting[k] = v
            report.loaded.append(k)
    report.missing = [k for k in own if k not in state_dict]
    if strict and not report.ok:
        raise CheckpointError(f"{source} does not match {type(module).__name__}:\n{report.describe()}")
    module.load_state_dict(fitting, strict=False, assign=assign)
    return report
