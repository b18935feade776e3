"""Regenerate the tiny offline test assets: a byte-level tokenizer and tiny random-model configs.

Run: ``.venv/bin/python tests/assets/make_assets.py``. The outputs are committed; this script only
documents how they were made. Every model folder holds ``config.json`` plus the same tokenizer, so
``AutoTokenizer.from_pretrained(folder)`` and ``load_llm(folder)`` work with no network.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

HERE = Path(__file__).parent
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
VOCAB = 320  # model vocab: 3 specials + 256 bytes, padded up


def build_tokenizer() -> Tokenizer:
    # A byte-level "BPE" with no merges: one token per byte, so any text encodes offline.
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1],
        "pad_token": SPECIALS[2],
        "model_max_length": 2048,
        "add_bos_token": False,
        "add_eos_token": False,
    }


COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
CONFIGS = {
    "tiny_llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "tiny_qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "tiny_qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "tiny_gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "sliding_window": 64,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
    "tiny_gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 4,
        "n_head": 4,
        "n_positions": 512,
        "n_inner": 128,
        "tie_word_embeddings": True,
    },
}


# Hand-written paragraphs (no copyrighted text); tiny_text.txt holds them, then shuffled mixtures,
# so that it has more than 100 documents and the held-out split (i % 100 == 99) is not empty.
PARAGRAPHS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He counted the steps out loud, one hundred and twelve of them, and never once lost his place.",
    "On the morning of the storm the harbour was empty. Gulls sat in rows along the sea wall, facing the wind, and the fishing boats had been pulled high onto the shingle.",
    "A transcoder reads the residual stream just before a layer's MLP and tries to write what that MLP would have added. Its features are meant to be sparse and readable.",
    "My grandmother kept her recipes in a tin box with a dented lid. Most were written on the backs of envelopes, and none of them listed the amounts she actually used.",
    "The river rose three feet overnight. By noon the footbridge was gone and the ducks were paddling across what had been the car park.",
    "Counting in base two is simple once you see it: each place is worth twice the place to its right, and every digit is either nothing or everything.",
    "When the train stopped between stations, nobody spoke. A child pressed her face to the window and announced that there were cows, and then everyone laughed.",
    "The library opened at nine. Students queued on the steps with coffee in paper cups, and the first one through the door always ran for the desk by the window.",
    "To bake bread you need flour, water, salt and time. Yeast helps, but patience matters more: the dough will tell you when it is ready if you let it.",
    "The old map showed a road that no longer existed. We followed it anyway, through a gate, across two fields, and into a wood where the path simply ended.",
    "In the evening the market traders packed their stalls into vans. Crates of unsold apples went back into storage, and the square slowly filled with pigeons.",
    "A sparse autoencoder reconstructs its own input. A crosslayer transcoder lets a feature read at one layer write to that layer and to every later one.",
    "The cat refused to come in from the garden. It sat under the hedge, watching something we could not see, and ignored every tin we shook at it.",
    "Winter came early that year. The first frost took the last of the tomatoes, and the pond froze thin enough to crack under a thrown pebble.",
    "He practised the same four bars of music for an hour. His sister, in the next room, could hum them perfectly by the end and never forgave him for it.",
    "The ferry left at seven and returned at six. Between those times the island belonged to the people who lived there, and to a great many sheep.",
    "Numbers that divide evenly into twelve are useful for clocks, for eggs and for inches. People have argued about whether we should have counted in twelves ever since.",
    "She planted the seeds in neat rows and labelled each one. By June the labels had faded in the sun and every plant looked exactly like a weed.",
    "The museum kept a whale skeleton suspended from the ceiling of the great hall. Children lay on the floor beneath it and tried to count its ribs.",
    "Rain drummed on the tin roof of the shed all afternoon. Inside, among the flowerpots and the broken chairs, it was dry and smelled of sawdust.",
    "Every good experiment has a control. If you change two things at once and the result improves, you have learned very little about either of them.",
    "The baker's van came round on Tuesdays and Fridays. If you missed it you walked two miles to the village, or you went without.",
    "At the top of the hill the wind was strong enough to lean on. Below us the town looked like a model, with toy cars crawling along its streets.",
    "The letter arrived thirty years late. It had been found behind a sorting machine, and the post office delivered it with a short note of apology.",
]


def tiny_text(n_mixed: int = 216) -> str:
    import random

    rng = random.Random(0)
    sentences = [s.strip() + "." for p in PARAGRAPHS for s in p.split(". ") if s.strip()]
    mixed = [" ".join(rng.sample(sentences, 3)).replace("..", ".") for _ in range(n_mixed)]
    return "\n\n".join(PARAGRAPHS + mixed) + "\n"


def main() -> None:
    (HERE / "tiny_text.txt").write_text(tiny_text())
    tok = build_tokenizer()
    for name, cfg in CONFIGS.items():
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**cfg, **COMMON}, indent=2) + "\n")
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(
            json.dumps(
                {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "pad_token": SPECIALS[2]}, indent=2
            )
            + "\n"
        )
    print("wrote", ", ".join(CONFIGS))


if __name__ == "__main__":
    main()
