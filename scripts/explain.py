#!/usr/bin/env python
"""Explain features with an LLM behind an OpenAI-compatible endpoint you name, and score the
explanations; both go into the feature files (``features/{id}.json``: ``explanation``).

  .venv/bin/python scripts/explain.py outputs/demo_smollm2_clt --endpoint http://localhost:8000/v1 \\
      --model my-model [--batch 8] [--limit 100] [--api-key-env OPENAI_API_KEY]

Per batch of ``--batch`` features, one chat-completion request shows each feature's top contexts
(its peak token marked ``<<like this>>``) and its promoted output tokens and asks for a one-line
explanation of each (a JSON object). A second request scores them by detection: for each feature,
four contexts, two of its own (from its random quantile sample, not the top ones it was explained
from) and two of other features, shuffled; the model says which fit the explanation, and the
score is the fraction it sorts right (0.5 is chance). Stored per feature: the explanation, the
model, both prompts and the score. Resumable: a feature explained by the same model is skipped
(``--force`` redoes it). Failed requests are retried (``--retries``, backing off); nothing is sent
anywhere but ``--endpoint``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPT = (
    "Each feature below is a direction in a language model's activations. For each, you see text "
    "where it fires, its peak token marked <<like this>>, and the tokens it makes likelier. Answer "
    "with one JSON object mapping each feature name to a short explanation (at most 12 words) of "
    "what it responds to. No other text.\n\n"
)
SCORE_PROMPT = (
    "For each feature below you get an explanation and numbered texts (the token in question marked "
    "<<like this>>). Answer with one JSON object mapping each feature name to the list of the "
    "numbers of the texts the explanation fits. No other text.\n\n"
)


RETRY_WAIT = 1.0  # seconds before the first retry (doubling)


class EndpointError(RuntimeError):
    pass


def chat(
    endpoint: str, model: str, prompt: str, key: str | None, retries: int = 3, timeout: float = 120
) -> str:
    """One chat completion (``POST {endpoint}/chat/completions``); its message text. Retries a
    failed request (connection error, 429 or 5xx) ``retries`` times, waiting 1, 2, 4 ... s."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0}
    ).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    url = endpoint.rstrip("/") + "/chat/completions"
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            if e.code not in (429, 500, 502, 503, 504) or attempt == retries:
                raise EndpointError(f"{url}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise EndpointError(f"{url}: {e} (after {retries + 1} tries)") from e
        time.sleep(2**attempt * RETRY_WAIT)
    raise AssertionError("unreachable")


def _answer(text: str) -> dict:
    """The JSON object in a model's answer (tolerating text or a code fence around it)."""
    start, end = text.find("{"), text.rfind("}")
    try:
        return json.loads(text[start : end + 1]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _show(example: dict) -> str:
    toks = list(example["tokens"])
    c = example["train_token_ind"]
    toks[c] = f"<<{toks[c]}>>"
    return "".join(toks).replace("\n", " ")


def _name(doc: dict) -> str:
    return f"feature {doc['index']}"


def explain_prompt(docs: list[dict], n_examples: int = 5) -> str:
    parts = [PROMPT]
    for d in docs:
        top = d["examples_quantiles"][0]["examples"][:n_examples]
        lines = "\n".join(f"  - {_show(e)}" for e in top)
        parts.append(f"{_name(d)}:\n{lines}\n  promotes: {' '.join(map(repr, d['top_logits'][:5]))}\n")
    return "\n".join(parts)


def score_prompt(
    docs: list[dict], explanations: dict, others: list[dict], rng: random.Random
) -> tuple[str, dict]:
    """(the detection prompt, per feature (the numbers of its own texts, how many texts))."""
    parts, truth = [SCORE_PROMPT], {}
    for d in docs:
        own = [e for q in d["examples_quantiles"][1:] for e in q["examples"]] or d["examples_quantiles"][0][
            "examples"
        ]
        mine = rng.sample(own, min(2, len(own)))
        pool = [
            e for o in others if o["index"] != d["index"] for e in o["examples_quantiles"][0]["examples"][:2]
        ]
        theirs = rng.sample(pool, min(2, len(pool)))
        texts = [(e, True) for e in mine] + [(e, False) for e in theirs]
        rng.shuffle(texts)
        truth[_name(d)] = ([i + 1 for i, (_, is_own) in enumerate(texts) if is_own], len(texts))
        lines = "\n".join(f"  {i + 1}. {_show(e)}" for i, (e, _) in enumerate(texts))
        parts.append(f"{_name(d)}: {explanations.get(_name(d), '')}\n{lines}\n")
    return "\n".join(parts), truth


def detection_score(said: list, truth: list[int], n: int) -> float:
    """Fraction of the ``n`` texts sorted right (in or out of the feature)."""
    said = {int(x) for x in said if str(x).isdigit()}
    return sum((i in said) == (i in truth) for i in range(1, n + 1)) / max(n, 1)


def explain(
    folder: str | Path,
    endpoint: str,
    model: str,
    key: str | None = None,
    batch: int = 8,
    limit: int | None = None,
    force: bool = False,
    retries: int = 3,
    seed: int = 0,
    log=print,
) -> dict:
    """Explain and score the features of ``folder`` (a run's ``features/`` or a run folder);
    returns counts."""
    folder = Path(folder)
    folder = folder / "features" if (folder / "features").is_dir() else folder
    files = sorted(folder.glob("[0-9]*.json"), key=lambda p: int(p.stem))
    if not files:
        raise FileNotFoundError(f"{folder} holds no feature files: run scripts/features.py first.")
    docs = {p: json.loads(p.read_text()) for p in files}
    todo = [p for p in files if force or (docs[p].get("explanation") or {}).get("model") != model]
    todo = todo[:limit] if limit is not None else todo
    rng = random.Random(seed)
    others = list(docs.values())
    done = 0
    for s in range(0, len(todo), batch):
        paths = todo[s : s + batch]
        group = [docs[p] for p in paths]
        prompt = explain_prompt(group)
        said = _answer(chat(endpoint, model, prompt, key, retries))
        sp, truth = score_prompt(group, said, others, rng)
        judged = _answer(chat(endpoint, model, sp, key, retries))
        for p, d in zip(paths, group):
            name = _name(d)
            own, n = truth[name]
            d["explanation"] = {
                "text": str(said.get(name, "")).strip(),
                "model": model,
                "endpoint": endpoint,
                "prompt": prompt,
                "score": detection_score(judged.get(name, []), own, n),
                "score_method": "detection: 2 own + 2 other contexts, fraction sorted right",
                "score_prompt": sp,
            }
            tmp = p.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(d))
            os.replace(tmp, p)  # a batch stopped halfway leaves every file whole: resumable
        done += len(paths)
        log(f"explained {done} of {len(todo)} features")
    return {"features": len(files), "explained": done, "skipped": len(files) - len(todo)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_FEATURES")
    p.add_argument(
        "--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1"
    )
    p.add_argument("--model", required=True, help="model name the endpoint serves")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--batch", type=int, default=8, help="features per request")
    p.add_argument("--limit", type=int, default=None, help="explain at most this many features")
    p.add_argument("--force", action="store_true", help="redo features this model already explained")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request")
    a = p.parse_args(argv)
    try:
        counts = explain(
            a.path, a.endpoint, a.model, os.environ.get(a.api_key_env), a.batch, a.limit, a.force, a.retries
        )
    except (EndpointError, FileNotFoundError) as e:
        print(f"explain: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
