"""Save and load model directories in the Hugging Face layout (or upstream AstrAI's).

    config.json                     our config, or a Llama/Qwen2/Qwen3/Mistral/Phi-3/Gemma/Mixtral/
                                    Qwen2-MoE one (see hf_config.py; their weight layouts: hf_families.py,
                                    hf_moe.py),
                                    or upstream AstrAI's (see upstream_config.py)
    generation_config.json          bos/eos ids for generation tools
    model.safetensors               or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, chat_template.jinja   when a tokenizer is given
    checksums.json                  sha256 and size of every file above (see integrity.py)

Every file is written atomically and the manifest last, so a save cut short never leaves a
file that contradicts it. Loading builds the model on the meta device and assigns the tensors
read from disk straight onto the target device, so weights are never materialised twice.
Each file is checked against the manifest once its format has parsed and before its values
are used, and no NaN or Inf weight is loaded. Every way a directory can be wrong ends in a
CheckpointError that names the file and the tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import AstraiError
from .hf_config import HFConfigError, from_hf_dict, hf_model_type, to_hf_dict
from .hf_families import from_hf_state, hf_shapes, to_hf_state
from .hf_moe import MOE_ARCHITECTURES, to_hf_moe_name
from .integrity import (
    MANIFEST_FILE,
    Entries,
    IntegrityError,
    atomic_write,
    atomic_write_text,
    read_manifest,
    record_files,
    remove_file,
    verify_file,
)
from .rope import RotaryEmbedding, rope_frequencies
from .sizes import parse_bytes
from .transformer import CausalLM
from .upstream_config import (
    UPSTREAM_FORMAT,
    UpstreamConfigError,
    from_upstream_dict,
    is_upstream_config,
    to_upstream_dict,
)
from .upstream_weights import from_upstream_state, to_upstream_name, to_upstream_state

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TIED_KEY = "lm_head.weight"
_EMBED_KEY = "model.embed_tokens.weight"
FORMATS = ("astrai", UPSTREAM_FORMAT)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


class CheckpointError(AstraiError):
    """A model directory cannot be read or written; the message names the file and the tensor."""


# -- saving ---------------------------------------------------------------------------------
def save_pretrained(
    model: CausalLM, path: str | Path, tokenizer=None, max_shard_size: int | str = "2GB", format: str = "astrai"
) -> Path:
    """Write `model` (and `tokenizer`) as a directory that we and transformers can both load, or
    with format="astrai-upstream" as upstream AstrAI's layout (one model.safetensors, its names)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_pretrained expects an astrai CausalLM, got {type(model).__name__}")
    if format not in FORMATS:
        raise CheckpointError(f"format {format!r} is not supported; use one of {list(FORMATS)}")
    config = model.config
    max_shard_bytes = parse_size(max_shard_size)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but config.vocab_size is {config.vocab_size}; "
            "build the model with vocab_size >= the tokenizer's vocab_size"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_to_save(model)
    dtype = next(iter(tensors.values())).dtype
    if format == UPSTREAM_FORMAT:
        config_json = _upstream_config_json(config)
        tensors = to_upstream_state(tensors, config)
        max_shard_bytes = float("inf")  # upstream reads a single model.safetensors
    else:
        config_json = to_hf_dict(config, str(dtype).removeprefix("torch."))
        tensors = _hf_moe_names(tensors, config_json["model_type"])
        tensors = to_hf_state(tensors, hf_model_type(config) or "astrai")  # Phi-3's fused, Gemma's norms
    remove_file(path / MANIFEST_FILE)  # until the new one is written, nothing here is listed
    written = [_write_json(path / CONFIG_FILE, config_json)]
    written += _write_generation_config(path, config, tokenizer)
    written += _write_weights(path, tensors, max_shard_bytes)
    record_files(path, written, create=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)  # adds its files to the manifest: the manifest is written last
    return path


def _upstream_config_json(config: ModelConfig) -> dict:
    try:
        return to_upstream_dict(config)
    except UpstreamConfigError as e:
        raise CheckpointError(str(e)) from None


def _hf_moe_names(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Mixtral's and Qwen2-MoE's names for the MoE tensors (hf_moe.py); others keep ours."""
    if model_type not in MOE_ARCHITECTURES:
        return tensors
    return {to_hf_moe_name(name, model_type): t for name, t in tensors.items()}


def _tensors_to_save(model: CausalLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop(_TIED_KEY)  # the same storage as embed_tokens; safetensors refuses shared tensors
    meta = [name for name, t in state.items() if t.is_meta]
    if meta:
        raise CheckpointError(f"cannot save a model whose weights are on the meta device (e.g. {meta[0]!r})")
    return state


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Write the shards (or the one file) and the index; returns the names written."""
    shards_on_disk = [p for p in path.glob("model-*.safetensors") if _SHARD_PATTERN.fullmatch(p.name)]
    for stale in [path / WEIGHTS_FILE, path / INDEX_FILE, *shards_on_disk]:
        stale.unlink(missing_ok=True)  # an older save must not leave weights the new one does not list
    shards = _split(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        _write_safetensors(path / WEIGHTS_FILE, shards[0], metadata)
        return [WEIGHTS_FILE]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(path / name, shard, metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return [*dict.fromkeys(weight_map.values()), _write_json(path / INDEX_FILE, index)]


def _write_safetensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    cpu = _to_cpu(tensors)
    atomic_write(file, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards in state-dict order; a tensor bigger than max_bytes gets a shard of its own."""
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def _write_generation_config(path: Path, config: ModelConfig, tokenizer) -> list[str]:
    bos = config.bos_token_id if config.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    eos = config.eos_token_id if config.eos_token_id is not None else _tokenizer_stops(tokenizer)
    pad = config.pad_token_id if config.pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    if bos is None and eos is None:
        (path / GENERATION_CONFIG_FILE).unlink(missing_ok=True)
        return []
    gen = {"bos_token_id": bos, "eos_token_id": eos}
    if pad is not None:
        gen["pad_token_id"] = pad
    return [_write_json(path / GENERATION_CONFIG_FILE, gen)]


def _tokenizer_stops(tokenizer) -> int | list[int] | None:
    stops = list(getattr(tokenizer, "stop_token_ids", None) or [])
    return None if not stops else stops[0] if len(stops) == 1 else stops


def parse_size(size: int | str) -> int:
    """``max_shard_size`` in bytes: "2GB" (powers of 1000, as transformers reads it), "500MiB" (powers
    of 1024) or an int; the one parser of astrai.core.sizes, raising CheckpointError."""
    return parse_bytes(size, "max_shard_size", CheckpointError)


def _write_json(path: Path, data: dict) -> str:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path.name


# -- loading --------------------------------------------------------------------------------
def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a model directory (ours, a Hugging Face one of a family in
    hf_config.HF_ARCHITECTURES, or upstream AstrAI's)."""
    return _load_config(_model_dir(path))[0]


def _load_config(path: Path) -> tuple[ModelConfig, str]:
    """(config, the weights' layout: UPSTREAM_FORMAT or config.json's model_type)."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; a model directory needs config.json next to its weights")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: must hold a JSON object, got {type(data).__name__}")
    upstream = is_upstream_config(data)
    try:
        config = from_upstream_dict(data) if upstream else from_hf_dict(data)
    except (HFConfigError, UpstreamConfigError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    _verify(path, CONFIG_FILE, _read_manifest(path))
    return config, UPSTREAM_FORMAT if upstream else str(data.get("model_type"))


def load_pretrained(path: str | Path, dtype: torch.dtype | str | None = None, device=None) -> CausalLM:
    """Load a model directory straight onto `device` in `dtype` (default: the stored dtype).

    The model comes back in eval mode, like a freshly loaded Hugging Face model.
    """
    path = _model_dir(path)
    config, layout = _load_config(path)
    manifest = _read_manifest(path)
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop(_TIED_KEY)
    if layout == UPSTREAM_FORMAT:
        expected = {to_upstream_name(name): shape for name, shape in expected.items()}
        state = from_upstream_state(_read_weights(path, expected, device, dtype, manifest), config)
    elif layout in MOE_ARCHITECTURES:
        ours = {to_hf_moe_name(name, layout): name for name in expected}
        on_disk = _read_weights(path, {name: expected[ours[name]] for name in ours}, device, dtype, manifest)
        state = {ours[name]: t for name, t in on_disk.items()}
    else:
        on_disk = _read_weights(path, hf_shapes(expected, layout), device, dtype, manifest)
        state = from_hf_state(on_disk, expected, layout)  # Phi-3's fused matrices, Gemma's norms
    model.load_state_dict(state, strict=False, assign=True)  # keys were checked above, tied head aside
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # non-persistent: never on disk, still on meta
            module.register_buffer("inv_freq", rope_frequencies(config)[0].to(device), persistent=False)
    return model.eval()


def _read_weights(
    path: Path, expected: dict[str, tuple], device: torch.device, dtype, manifest: Entries | None
) -> dict[str, torch.Tensor]:
    files = _weight_files(path, manifest)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file, listed in files.items():
        for name, tensor in _read_file(path / file, listed, expected, device, dtype, manifest):
            if name in state:
                raise CheckpointError(f"{file}: tensor {name!r} is also stored in {origin[name]}")
            state[name], origin[name] = tensor, file
    embed_key = _EMBED_KEY if _EMBED_KEY in expected else to_upstream_name(_EMBED_KEY)
    if _TIED_KEY not in expected and _TIED_KEY in state:
        _check_tied_copy(state, origin, embed_key)
    missing = [name for name in expected if name not in state]
    if missing:
        where = INDEX_FILE if len(files) > 1 else next(iter(files))
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = (
            "; if the head shares the embedding matrix, set tie_word_embeddings (astrai: tie_embeddings; "
            "upstream AstrAI v1.3.9: tie_weight) to true"
            if missing == [_TIED_KEY]
            else "; the weights do not match config.json"
        )
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}{more}{hint}")
    if dtype is None:  # keep the stored dtype; a mixed checkpoint follows its embeddings
        target = state[embed_key].dtype
        for name in state:
            state[name] = state[name].to(target)
    return state


def _read_file(
    file: Path, listed: set[str] | None, expected: dict[str, tuple], device, dtype, manifest: Entries | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in one safetensors file: names and shapes first, then the
    file's checksum, then the values, each of which must be finite."""
    if not file.is_file():
        raise CheckpointError(f"{file.name}: not found in {file.parent}")
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            absent = sorted((listed or set()) - set(f.keys()))
            if absent:
                raise CheckpointError(
                    f"{file.name}: tensor {absent[0]!r} is listed in {INDEX_FILE} but not in the file"
                )
            # old transformers checkpoints saved the derived rotary_emb.inv_freq buffer
            names = [name for name in f.keys() if not name.endswith("rotary_emb.inv_freq")]
            for name in names:
                _check_tensor(file.name, name, tuple(f.get_slice(name).get_shape()), expected)
            _verify(file.parent, file.name, manifest)
            for name in names:
                tensor = f.get_tensor(name)
                _check_finite(file.name, name, tensor)
                yield name, tensor if dtype is None else tensor.to(dtype)
    except SafetensorError as e:
        raise CheckpointError(
            f"{file.name}: not a readable safetensors file ({e}); it is corrupt or truncated, save or copy it again"
        ) from None


def _check_tensor(file: str, name: str, shape: tuple, expected: dict[str, tuple]) -> None:
    if name == _TIED_KEY and name not in expected:
        return  # a tied model stored with its lm_head copy; checked against embed_tokens below
    if name not in expected:
        raise CheckpointError(
            f"{file}: unexpected tensor {name!r} {shape}; the config does not describe such a weight "
            "(wrong config.json, or a checkpoint of another architecture)"
        )
    if shape != expected[name]:
        raise CheckpointError(f"{file}: tensor {name!r} has shape {shape} but the config expects {expected[name]}")


def _check_finite(file: str, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        return
    # NaN and Inf propagate through a sum, so a finite sum clears the tensor in one pass without
    # a mask the size of the tensor; only a non-finite sum (possibly an overflow) needs the count.
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if torch.isfinite(tensor.sum(dtype=wide)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(
            f"{file}: tensor {name!r} holds {bad} NaN or Inf values (of {tensor.numel()}), which make "
            "every output NaN; export the model again from a checkpoint saved before training diverged, "
            "or download it again"
        )


def _check_tied_copy(state: dict[str, torch.Tensor], origin: dict[str, str], embed_key: str) -> None:
    head = state.pop(_TIED_KEY)
    embed = state.get(embed_key)
    if embed is not None and not torch.equal(head, embed):
        raise CheckpointError(
            f"{origin[_TIED_KEY]}: tensor {_TIED_KEY!r} differs from {embed_key!r} but config.json says "
            "the embeddings are tied; set tie_word_embeddings (astrai: tie_embeddings) to false"
        )


def _weight_files(path: Path, manifest: Entries | None) -> dict[str, set[str] | None]:
    """{file name: tensor names the index puts there (None without an index)}."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files: dict[str, set[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, set()).add(name)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{index}: not a valid index (needs a 'weight_map' of tensor -> file): {e!r}"
            ) from None
        _verify(path, INDEX_FILE, manifest)
        return files
    if (path / WEIGHTS_FILE).is_file():
        return {WEIGHTS_FILE: None}
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    hint = f"; found {others}: convert them to safetensors" if others else ""
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def _read_manifest(path: Path) -> Entries | None:
    try:
        return read_manifest(path)
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None


def _verify(path: Path, name: str, manifest: Entries | None) -> None:
    try:
        verify_file(path, name, manifest)
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: model directory not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; pass the model directory that holds config.json")
    return path


def _resolve_device(device) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[name]
