"""Write an activation cache once, then train many dictionaries from it (``data.source = "cache"``).

    python scripts/cache_activations.py --config train_configs/demo_smollm2_clt.toml --out cache/demo
    torchrun --nproc_per_node 8 scripts/cache_activations.py --config FILE --out DIR --tokens 100000000

Options: --out DIR (default data.cache_dir), --rows N or --tokens N (default: what one run of the
config reads), --shard-rows N, --dtype bfloat16|float16|float32, --device; then any
``--section.field=value`` config overrides. Rerun the same command to finish an interrupted cache.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_clt.data.cache_writer import main  # noqa: E402

if __name__ == "__main__":
    main()
