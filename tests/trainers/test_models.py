"""Models load by alias, folder or hub id, train the right weights and survive save and load."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from transformers import PreTrainedModel

from trainers.errors import ModelError
from trainers.models import (
    Generator,
    _build_once,
    load_embedder,
    load_embedder_checkpoint,
    load_generator,
    load_generator_checkpoint,
    parameter_counts,
    save_embedder,
    save_generator,
    weights_fingerprint,
)

CPU = torch.device("cpu")
TEXTS = ["Who built the first bridge in 1204?", "Ünïcode, digits 0123456789 and tabs\t!"]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so each tiny model is built once."""
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The constant is read once at import; patch it so no test waits on a network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _logits(generator: Generator, text: str = "The answer is 42.") -> torch.Tensor:
    batch = generator.tokenizer([text], return_tensors="pt")
    generator.model.eval()
    with torch.no_grad():
        return generator.model(**batch).logits


def _perturb(parameters: list[torch.nn.Parameter], seed: int = 1) -> None:
    """Random values, so a lost weight cannot pass for a kept one (lora_B starts at zero)."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=rng) * 0.5)


# ---- embedder ------------------------------------------------------------------------------


def test_tiny_embedder_is_built_once_then_loaded_from_its_folder(tmp_path: Path) -> None:
    first = load_embedder("tiny", cache_dir=tmp_path, device=CPU)
    weights_file = tmp_path / "models" / "tiny-embedder" / "model.safetensors"
    written_at = weights_file.stat().st_mtime_ns

    second = load_embedder("tiny", cache_dir=tmp_path, device=CPU)

    assert weights_file.stat().st_mtime_ns == written_at
    assert weights_fingerprint(second) == weights_fingerprint(first)
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tiny_models_are_deterministic_across_caches(tmp_path: Path, tiny_cache: Path) -> None:
    here = load_embedder("tiny", cache_dir=tmp_path, device=CPU)
    there = load_embedder("tiny", cache_dir=tiny_cache, device=CPU)
    assert weights_fingerprint(here) == weights_fingerprint(there)
    here_g = load_generator("tiny", cache_dir=tmp_path, device=CPU, finetune="full")
    there_g = load_generator("tiny", cache_dir=tiny_cache, device=CPU, finetune="full")
    assert weights_fingerprint(here_g.model) == weights_fingerprint(there_g.model)
    assert (tmp_path / "models" / "tiny-generator" / "tokenizer.json").read_bytes() == (
        tiny_cache / "models" / "tiny-generator" / "tokenizer.json"
    ).read_bytes()


def test_building_tiny_models_leaves_the_callers_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_embedder("tiny", cache_dir=tmp_path, device=CPU)
    load_generator("tiny", cache_dir=tmp_path, device=CPU, finetune="full")
    assert torch.equal(torch.rand(4), expected)


def test_lora_init_follows_the_callers_seed(tiny_cache: Path) -> None:
    fingerprints = []
    for _ in range(2):
        torch.manual_seed(7)  # the trial seed decides the adapter's random init
        generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU)
        fingerprints.append(weights_fingerprint(generator.model))
    assert fingerprints[0] == fingerprints[1]


def test_tiny_embedder_outputs_unit_norm_vectors(tiny_cache: Path) -> None:
    embedder = load_embedder("tiny", cache_dir=tiny_cache, device=CPU)
    vectors = embedder.encode(TEXTS, convert_to_tensor=True)  # (2, dim)
    dim = embedder.get_embedding_dimension()
    assert dim is not None and 32 <= dim <= 64
    assert vectors.shape == (2, dim)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))
    assert not torch.allclose(vectors[0], vectors[1])


def test_embedder_trains_every_weight(tiny_cache: Path) -> None:
    total, trainable = parameter_counts(load_embedder("tiny", cache_dir=tiny_cache, device=CPU))
    assert 100_000 <= total <= 1_000_000  # "a few hundred K": fast, yet not trivial
    assert trainable == total


def test_embedder_save_and_load_checkpoint_give_identical_embeddings(
    tiny_cache: Path, tmp_path: Path
) -> None:
    embedder = load_embedder("tiny", cache_dir=tiny_cache, device=CPU)
    _perturb([next(embedder.parameters())])

    save_embedder(embedder, tmp_path / "ckpt")
    loaded = load_embedder_checkpoint(tmp_path / "ckpt", device=CPU)

    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert not list((tmp_path / "ckpt").rglob("*.bin"))
    assert torch.equal(
        loaded.encode(TEXTS, convert_to_tensor=True), embedder.encode(TEXTS, convert_to_tensor=True)
    )
    assert weights_fingerprint(loaded) == weights_fingerprint(embedder)
    assert parameter_counts(loaded)[1] == parameter_counts(loaded)[0]


# ---- generator -----------------------------------------------------------------------------


def test_tiny_generator_tokenizer_pads_right_and_encodes_any_text(tiny_cache: Path) -> None:
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU)
    tokenizer = generator.tokenizer
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "right"
    for text in TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: no unknowns
    batch = tokenizer(["a", "a much longer line"], padding=True)
    assert batch["attention_mask"][0][0] == 1 and batch["attention_mask"][0][-1] == 0


def test_lora_trains_only_adapter_weights(tiny_cache: Path) -> None:
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU, lora_rank=4)
    trainable_names = [n for n, p in generator.model.named_parameters() if p.requires_grad]
    total, trainable = parameter_counts(generator.model)

    assert generator.finetune == "lora"
    assert trainable_names and all("lora_" in name for name in trainable_names)
    assert trainable < total / 10


def test_full_trains_every_weight(tiny_cache: Path) -> None:
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU, finetune="full")
    total, trainable = parameter_counts(generator.model)
    assert not any("lora_" in name for name, _ in generator.model.named_parameters())
    assert trainable == total


def test_lora_checkpoint_round_trip_gives_identical_logits(
    tiny_cache: Path, tmp_path: Path
) -> None:
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU, lora_rank=4)
    base_logits = _logits(generator)
    _perturb([p for n, p in generator.model.named_parameters() if "lora_B" in n])
    trained_logits = _logits(generator)

    save_generator(generator, tmp_path / "ckpt")
    loaded = load_generator_checkpoint(
        tmp_path / "ckpt", base_name="tiny", cache_dir=tiny_cache, device=CPU, finetune="lora"
    )

    assert not torch.allclose(trained_logits, base_logits)  # the adapter matters
    assert torch.equal(_logits(loaded), trained_logits)
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "ckpt").rglob("*.bin"))
    assert parameter_counts(loaded.model)[1] == parameter_counts(generator.model)[1]


def test_merged_save_matches_the_adapter_and_loads_without_it(
    tiny_cache: Path, tmp_path: Path
) -> None:
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU, lora_rank=4)
    _perturb([p for n, p in generator.model.named_parameters() if "lora_B" in n])

    save_generator(generator, tmp_path / "ckpt", merged=True)
    merged = load_generator(
        str(tmp_path / "ckpt" / "merged"), cache_dir=tiny_cache, device=CPU, finetune="full"
    )

    torch.testing.assert_close(_logits(merged), _logits(generator), atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "ckpt" / "merged" / "adapter_config.json").exists()
    # The caller's model keeps its adapter.
    assert any("lora_" in name for name, _ in generator.model.named_parameters())


def test_full_checkpoint_round_trip_gives_identical_logits(
    tiny_cache: Path, tmp_path: Path
) -> None:
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU, finetune="full")
    _perturb([dict(generator.model.named_parameters())["model.embed_tokens.weight"]])

    save_generator(generator, tmp_path / "ckpt")
    loaded = load_generator_checkpoint(
        tmp_path / "ckpt", base_name="tiny", cache_dir=tiny_cache, device=CPU, finetune="full"
    )

    assert torch.equal(_logits(loaded), _logits(generator))
    assert weights_fingerprint(loaded.model) == weights_fingerprint(generator.model)
    assert parameter_counts(loaded.model)[1] == parameter_counts(loaded.model)[0]


def test_no_model_is_loaded_with_hub_kernels(tiny_cache: Path, tmp_path: Path) -> None:
    # transformers turns on layers downloaded from the Hub at load time unless told not to; on
    # CUDA they are fetched at the first .train(), so an offline GPU trial failed there. Checked
    # through the flag, which transformers sets on CPU too.
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU, lora_rank=4)
    save_generator(generator, tmp_path / "generator")
    embedder = load_embedder("tiny", cache_dir=tiny_cache, device=CPU)
    save_embedder(embedder, tmp_path / "embedder")
    loaded = [
        generator.model,
        load_generator("tiny", cache_dir=tiny_cache, device=CPU, finetune="full").model,
        load_generator_checkpoint(
            tmp_path / "generator",
            base_name="tiny",
            cache_dir=tiny_cache,
            device=CPU,
            finetune="lora",
        ).model,
        embedder,
        load_embedder_checkpoint(tmp_path / "embedder", device=CPU),
    ]
    for model in loaded:
        pretrained = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
        assert pretrained
        assert not any(m.use_kernels for m in pretrained)


def test_checkpoint_without_safetensors_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU, lora_rank=4)
    save_generator(generator, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "adapter_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))

    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        load_generator_checkpoint(
            tmp_path / "ckpt", base_name="tiny", cache_dir=tiny_cache, device=CPU, finetune="lora"
        )


def test_lora_checkpoint_loaded_as_full_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    generator = load_generator("tiny", cache_dir=tiny_cache, device=CPU, lora_rank=4)
    save_generator(generator, tmp_path / "ckpt")
    with pytest.raises(ModelError, match="finetune='lora'"):
        load_generator_checkpoint(
            tmp_path / "ckpt", base_name="tiny", cache_dir=tiny_cache, device=CPU, finetune="full"
        )


def test_qlora_without_cuda_is_refused_with_the_fix(tiny_cache: Path) -> None:
    with pytest.raises(ModelError, match="generator_finetune: lora on CPU"):
        load_generator("tiny", cache_dir=tiny_cache, device=CPU, finetune="qlora")


# ---- names, fingerprints, counts -----------------------------------------------------------


@pytest.mark.parametrize("load", [load_embedder, load_generator], ids=["embedder", "generator"])
@pytest.mark.parametrize("name", ["ragsweep-no-such-org/no-such-model", "/no/such/folder"])
def test_unknown_name_gives_a_one_line_error(
    load, name: str, tmp_path: Path, hub_offline: None
) -> None:
    with pytest.raises(ModelError) as caught:
        load(name, cache_dir=tmp_path, device=CPU)
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{name}'" in message and "not a built-in alias" in message
    assert "pass a local folder" in message


def test_folder_without_a_model_gives_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    for load in (load_embedder, load_generator):
        with pytest.raises(ModelError, match="cannot load .* from folder") as caught:
            load(str(tmp_path), cache_dir=tmp_path, device=CPU)
        assert "\n" not in str(caught.value)


def test_weights_fingerprint_changes_with_one_weight() -> None:
    last = torch.nn.Linear(3, 2)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), last)
    before = weights_fingerprint(module)
    assert weights_fingerprint(module) == before
    with torch.no_grad():
        last.weight[0, 0] += 1e-3
    assert weights_fingerprint(module) != before
    assert weights_fingerprint(module.to(torch.bfloat16)) != weights_fingerprint(module.float())


def test_parameter_counts_separate_frozen_weights() -> None:
    module = torch.nn.Linear(4, 3)  # 12 weights + 3 biases
    module.bias.requires_grad_(False)
    assert parameter_counts(module) == (15, 12)


def test_build_once_leaves_nothing_behind_when_the_build_fails(tmp_path: Path) -> None:
    def failing_build(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _build_once(tmp_path / "models" / "tiny-generator", failing_build)
    assert list((tmp_path / "models").iterdir()) == []


def test_build_once_keeps_the_folder_another_process_finished_first(tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny-generator"

    def racing_build(folder: Path) -> None:
        (folder / "who").write_text("loser")
        target.mkdir()  # the other process renames its complete folder in meanwhile
        (target / "who").write_text("winner")

    assert _build_once(target, racing_build) == target
    assert (target / "who").read_text() == "winner"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-generator"]


# ---- the real built-in models (slow) -------------------------------------------------------


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session, so SmolLM2 is converted from GGUF once."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.mark.slow
def test_minilm_alias_embeds_similar_questions_closer(real_cache: Path) -> None:
    embedder = load_embedder("minilm", cache_dir=real_cache, device=CPU)
    vectors = embedder.encode(
        [
            "Who founded the city library?",
            "Which person started the town's library?",
            "Bananas are rich in potassium.",
        ],
        convert_to_tensor=True,
    )  # (3, 384)
    assert vectors.shape == (3, 384)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_answers(real_cache: Path) -> None:
    generator = load_generator("smollm2-135m", cache_dir=real_cache, device=CPU)
    folder = real_cache / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    tokenizer = generator.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt = tokenizer(str(text), return_tensors="pt")
    model: Any = generator.model  # a PeftModel; nn.Module's type does not show generate
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # the dequantized weights survived the conversion

    started = time.perf_counter()
    load_generator("smollm2-135m", cache_dir=real_cache, device=CPU)
    assert time.perf_counter() - started < 5.0
