"""Random-weight copies of the demo's two models (same shapes and tokenizers), on a GPU machine the
real weights cannot travel to (benchmarks/gpu/check.sh): a step's cost does not depend on them.
Run: python3 benchmarks/gpu/make_models.py CONFIGS CACHE EMBEDDER_FOLDER
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

configs, cache, embedder = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
torch.manual_seed(0)
# Where trainers.models looks for the converted built-in generator.
generator = cache / "models" / "smollm2-135m"
shutil.copytree(configs / "smollm2-135m", generator, dirs_exist_ok=True)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(generator)).save_pretrained(generator)
shutil.copytree(configs / "minilm", embedder, dirs_exist_ok=True)
AutoModel.from_config(AutoConfig.from_pretrained(embedder)).save_pretrained(embedder)
print(f"random-weight models in {generator} and {embedder}")
