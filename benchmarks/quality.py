"""Quality kept at each budget: every preset at 50/35/20/10/5% against the full cache, on real models.

    python benchmarks/quality.py                  # Gemma-3-270M and SmolLM2-135M, every preset and budget
    python benchmarks/quality.py --quick          # a tiny random model, two budgets: checks the script runs
    python benchmarks/quality.py --models /path/to/model.gguf --budgets 0.2,0.05

Tasks, generated from ``--seed`` so a run is reproducible:
- passkey: a five-digit key at several depths of repeated filler, at several lengths;
- kv: many "key abcd: 12345." pairs, one queried;
- vars: a three-hop chain VAR A = 12345 ... VAR B = VAR A ... VAR C = VAR B in filler, C queried;
- loss: the mean next-token loss on a natural text (Python's reference manual, shipped with every
  Python as ``pydoc_data``) continued after the compressed context. It moves before accuracy
  collapses, so it separates methods that all still answer.
An answer is right when the first number the model writes is the expected one (greedy decoding).

The full cache runs the model's own forward; each policy runs through ``kvfx.compile`` (one trace
per model: ``kvfx.set_policy`` rewrites the traced graphs for each policy and budget). Each
result records the bytes of KV cache the model held after the prompt, as a fraction of the full
cache's. Writes ``quality.json``, ``quality.md`` and one PNG per model to ``--out`` (default
docs/results/), and refreshes the tables in docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import random
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kvfx  # noqa: E402

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


@dataclasses.dataclass
class Prompt:
    task: str
    length: int  # tokens, as tokenized
    depth: float
    ids: torch.Tensor
    answer: str


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    policies: tuple[str, ...]
    budgets: tuple[float, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    loss_context: int
    loss_tokens: int
    loss_texts: int
    seed: int
    inner: str
    max_new_tokens: int = 7
    sum_queries: int = 0   # > 0: each attention-sum preset also with its sums from the last n queries only
    suite: str = "standard"
    per_length: int = 1    # the retrieval suite: multi-key prompts per length (and a quarter as many chains)


# -- tasks --------------------------------------------------------------------

def _render(tokenizer, body: str, cue: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + cue
    return f"{body} {cue}"


def _encode(tokenizer, text: str) -> torch.Tensor:
    from kvfx.models import encode_prompt

    return encode_prompt(tokenizer, text)["input_ids"]


def _fit(tokenizer, make, target: int) -> tuple[torch.Tensor, int]:
    """Token ids of ``make(n)`` for the largest n whose prompt has at most ``target`` tokens, and n."""
    lo, hi = 0, target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _encode(tokenizer, make(mid)).shape[-1] <= target:
            lo = mid
        else:
            hi = mid - 1
    return _encode(tokenizer, make(lo)), lo


def _key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def passkey(tokenizer, length: int, depth: float, rng: random.Random) -> Prompt:
    key = _key(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about it.")

    def make(n: int) -> str:
        filler = [FILLER[i % len(FILLER)] for i in range(n)]
        at = round(depth * n)
        return _render(tokenizer, " ".join([intro] + filler[:at] + [needle] + filler[at:] + ["What is the pass key?"]),
                       "The pass key is")

    ids, _ = _fit(tokenizer, make, length)
    return Prompt("passkey", ids.shape[-1], depth, ids, key)


def key_values(tokenizer, length: int, depth: float, rng: random.Random) -> Prompt:
    pairs: list[tuple[str, str]] = []
    names = set()
    while len(pairs) < length:  # more pairs than can fit; _fit takes a prefix
        name = "".join(rng.choices(string.ascii_lowercase, k=4))
        if name not in names:
            names.add(name)
            pairs.append((name, _key(rng)))

    def asked(n: int) -> tuple[str, str]:
        return pairs[min(round(depth * n), max(n - 1, 0))]

    def make(n: int) -> str:
        name = asked(n)[0]
        lines = [f"key {k}: {v}." for k, v in pairs[:max(n, 1)]]
        body = "Below is a list of keys, each with its value. Remember them.\n" + "\n".join(lines)
        return _render(tokenizer, body + f"\nWhat is the value of key {name}?", f"The value of key {name} is")

    ids, n = _fit(tokenizer, make, length)
    return Prompt("kv", ids.shape[-1], depth, ids, asked(n)[1])


def variables(tokenizer, length: int, depth: float, rng: random.Random) -> Prompt:
    value = _key(rng)
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(3)]
    lines = [f"VAR {names[0]} = {value}.", f"VAR {names[1]} = VAR {names[0]}.", f"VAR {names[2]} = VAR {names[1]}."]
    where = sorted(rng.uniform(0.05, 0.95) for _ in lines)
    where[0] = min(where[0], depth)  # the value itself sits at ``depth`` or earlier

    def make(n: int) -> str:
        sentences = [FILLER[i % len(FILLER)] for i in range(n)]
        for line, at in sorted(zip(lines, where), key=lambda p: -p[1]):
            sentences.insert(round(at * n), line)
        body = "Memorize the variables assigned in the text below.\n" + " ".join(sentences)
        return _render(tokenizer, body + f"\nWhat is the value of VAR {names[2]}?", f"The value of VAR {names[2]} is")

    ids, _ = _fit(tokenizer, make, length)
    return Prompt("vars", ids.shape[-1], depth, ids, value)


def multi_key(tokenizer, length: int, depth: float, rng: random.Random, keys: int = 6) -> Prompt:
    """``keys`` named five-digit codes hidden at spread depths of a natural
    text (Python's reference manual); the question asks for the one nearest
    ``depth``. The others are distractors of the same form."""
    names = rng.sample(["apple", "river", "falcon", "copper", "meadow", "lantern", "harbor", "violet", "glacier",
                        "pepper", "saturn", "willow"], keys)
    codes = [_key(rng) for _ in names]
    where = sorted(rng.uniform(0.05, 0.95) for _ in names)
    asked = min(range(keys), key=lambda i: abs(where[i] - depth))
    words = _haystack(rng)

    def make(n: int) -> str:
        text = words[:n]
        for i in sorted(range(keys), key=lambda i: -where[i]):
            text = text[:round(where[i] * n)] + [f"The special code for {names[i]} is {codes[i]}."] + \
                text[round(where[i] * n):]
        body = ("Some special codes are hidden in the text below, each for a name. Remember them.\n"
                + " ".join(text))
        return _render(tokenizer, body + f"\nWhat is the special code for {names[asked]}?",
                       f"The special code for {names[asked]} is")

    ids, _ = _fit(tokenizer, make, length)
    return Prompt("multikey", ids.shape[-1], where[asked], ids, codes[asked])


def _haystack(rng: random.Random, words: int = 20000) -> list[str]:
    """Words of Python's reference manual from a random topic on: a natural text to hide things in."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    i, out = rng.randrange(len(names)), []
    while len(out) < words:
        out += topics[names[i % len(names)]].split()
        i += 1
    return out[:words]


TASKS = {"passkey": passkey, "kv": key_values, "vars": variables, "multikey": multi_key}
# --suite: default lengths and (retrieval) multi-key prompts per length; build_prompts picks the tasks.
SUITES = {
    "standard": dict(lengths=(512, 1024)),
    "retrieval": dict(lengths=(2048, 4096), per_length=8),
}


def natural_texts(tokenizer, settings: Settings) -> list[torch.Tensor]:
    """``loss_texts`` stretches of Python's reference manual, each context + continuation tokens long."""
    from pydoc_data.topics import topics

    rng = random.Random(settings.seed)
    names = sorted(topics)
    need = settings.loss_context + settings.loss_tokens
    texts = []
    for _ in range(settings.loss_texts):
        start = rng.randrange(len(names))
        text, i = "", start
        while True:
            text += topics[names[i % len(names)]] + "\n"
            ids = _encode(tokenizer, text)
            if ids.shape[-1] >= need:
                texts.append(ids[:, :need])
                break
            i += 1
    return texts


def build_prompts(tokenizer, settings: Settings) -> list[Prompt]:
    rng = random.Random(settings.seed)
    prompts = []
    for length in settings.lengths:
        if settings.suite == "retrieval":
            # ``per_length`` multi-key prompts asking at depths spread evenly over
            # the prompt, and a quarter as many variable chains: the README's
            # models fail those even with the full cache (docs/results.md).
            n = settings.per_length
            prompts += [multi_key(tokenizer, length, (i + 0.5) / n, rng) for i in range(n)]
            prompts += [variables(tokenizer, length, (i + 0.5) / max(1, n // 4), rng) for i in range(max(1, n // 4))]
            continue
        for depth in settings.depths:
            prompts.append(passkey(tokenizer, length, depth, rng))
        prompts.append(key_values(tokenizer, length, rng.uniform(0.1, 0.9), rng))
        prompts.append(variables(tokenizer, length, rng.uniform(0.1, 0.6), rng))
    return prompts


# -- running ------------------------------------------------------------------

def _last_logits(model) -> dict[str, int]:
    """Only the last position's logits: Gemma's 262k-word head over a whole prompt costs more than the model."""
    forward = getattr(model, "_kvfx_original_forward", None) or model.forward
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}


@torch.no_grad()
def answer(model, tokenizer, prompt: Prompt, max_new_tokens: int) -> tuple[str, int]:
    """Greedy answer and the cache bytes held after the prompt."""
    out = model(input_ids=prompt.ids, use_cache=True, **_last_logits(model))
    held = common.cache_bytes(out.past_key_values)
    eos = getattr(tokenizer, "eos_token_id", None)
    tokens = []
    nxt = out.logits[:, -1:].argmax(-1)
    for step in range(max_new_tokens):
        tokens.append(int(nxt))
        if eos is not None and int(nxt) == eos or step == max_new_tokens - 1:
            break
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip(), held


@torch.no_grad()
def continuation_loss(model, ids: torch.Tensor, context: int) -> tuple[float, int]:
    """Mean next-token loss over the continuation after ``context`` tokens, and the cache bytes after the context."""
    out = model(input_ids=ids[:, :context], use_cache=True, **_last_logits(model))
    held = common.cache_bytes(out.past_key_values)
    rest = ids[:, context:]
    out = model(input_ids=rest, past_key_values=out.past_key_values, use_cache=True)
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), rest[0, 1:])
    return float(loss), held


def evaluate(model, tokenizer, prompts: list[Prompt], texts: list[torch.Tensor], settings: Settings) -> dict[str, Any]:
    samples, held = [], []
    for p in prompts:
        said, nbytes = answer(model, tokenizer, p, settings.max_new_tokens)
        samples.append({"task": p.task, "length": p.length, "depth": round(p.depth, 3), "answer": p.answer,
                        "said": said, "correct": common.first_number(said) == p.answer})
        held.append(nbytes)
    losses = []
    for ids in texts:
        loss, nbytes = continuation_loss(model, ids, settings.loss_context)
        losses.append(loss)
        held.append(nbytes)
    tasks = {t: [s["correct"] for s in samples if s["task"] == t] for t in TASKS}
    return {
        "accuracy": sum(s["correct"] for s in samples) / len(samples),
        "correct": sum(s["correct"] for s in samples),
        "asked": len(samples),
        "by_task": {t: sum(v) / len(v) for t, v in tasks.items() if v},
        "loss": sum(losses) / len(losses),
        "held_bytes": held,
        "samples": samples,
    }


def run_model(name: str, settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    model, tokenizer, description = common.load(name)
    common.progress(f"[quality] {description}")
    prompts = build_prompts(tokenizer, settings)
    texts = natural_texts(tokenizer, settings)
    shortest = min([p.length for p in prompts] + [settings.loss_context])
    heads = ()
    # The heads RazorAttention() finds for itself (probed once, cached).
    if any(p.partition("+")[0] == "RazorAttention" for p in settings.policies):
        heads = kvfx.heads.cached_retrieval_heads(model)
    full, full_s = common.timed(evaluate, model, tokenizer, prompts, texts, settings)
    common.progress(f"[quality] {name} full cache: {full['correct']}/{full['asked']} right, loss {full['loss']:.3f} ({full_s:.0f}s)")
    results = []
    first = True
    for budget in settings.budgets:
        for pname, policy in common.policy_grid(list(settings.policies), budget, shortest, heads,
                                                settings.sum_queries, tokenizer).items():
            if first:  # one trace per model; every later policy is a rewrite of the same graphs
                common.fresh_compile(model, policy, settings.inner)
                first = False
            else:
                kvfx.set_policy(model, policy)
            res, seconds = common.timed(evaluate, model, tokenizer, prompts, texts, settings)
            res["kv_fraction"] = sum(res["held_bytes"]) / sum(full["held_bytes"])
            res["loss_delta"] = res["loss"] - full["loss"]
            res.update(policy=pname, budget=budget, spec=repr(policy), seconds=round(seconds, 2))
            results.append(res)
            common.progress(f"[quality] {name} {policy!r}: {res['correct']}/{res['asked']} right, "
                            f"loss {res['loss']:.3f} (Δ {res['loss_delta']:+.3f}), KV {res['kv_fraction']:.0%} ({seconds:.0f}s)")
    kvfx.restore(model)
    torch._dynamo.reset()
    return {"description": description, "retrieval_heads": [list(h) for h in heads],
            "prompts": [{"task": p.task, "length": p.length, "depth": round(p.depth, 3)} for p in prompts],
            "full": full, "results": results, "seconds": round(time.perf_counter() - started, 1)}


# -- reporting ----------------------------------------------------------------

def tables(data: dict[str, Any]) -> str:
    parts = []
    budgets = data["settings"]["budgets"]
    for name, m in data["models"].items():
        full = m["full"]
        header = ["policy"] + [f"{b:.0%}" for b in budgets]
        by = {(r["policy"], r["budget"]): r for r in m["results"]}
        policies = list(dict.fromkeys(r["policy"] for r in m["results"]))

        def grid(cell):
            return [[p] + [cell(by[(p, b)]) if (p, b) in by else "" for b in budgets] for p in policies]

        parts.append(f"### {name}\n\n{m['description']}\n\n"
                     f"Full cache: **{full['correct']}/{full['asked']}** answers right "
                     f"({', '.join(f'{t} {v:.0%}' for t, v in full['by_task'].items())}), "
                     f"continuation loss **{full['loss']:.3f}**.\n")
        parts.append(f"Answers right (of {full['asked']}; full cache: {full['correct']}), by budget, with the KV "
                     "bytes held after the prompt as a fraction of the full cache's:\n\n"
                     + common.markdown_table(header, grid(lambda r: f"{r['correct']} ({r['kv_fraction']:.0%})"))
                     + "\n\nContinuation loss minus the full cache's (lower is better; 0 = no loss):\n\n"
                     + common.markdown_table(header, grid(lambda r: f"{r['loss_delta']:+.3f}"))
                     + "\n\nKV cache held after the prompt, as a fraction of the full cache (all layers):\n\n"
                     + common.markdown_table(header, grid(lambda r: f"{r['kv_fraction']:.0%}"))
                     + f"\n\n![quality of {name}](results/{stem(data['settings'])}_{_slug(name)}.png)\n")
    return "\n".join(parts)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).name)


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    markers = "osD^v<>ph*"
    for name, m in data["models"].items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
        policies = list(dict.fromkeys(r["policy"] for r in m["results"]))
        for i, p in enumerate(policies):
            rows = sorted((r for r in m["results"] if r["policy"] == p), key=lambda r: r["budget"])
            xs = [100 * r["budget"] for r in rows]
            style = dict(marker=markers[i % len(markers)], color=plt.cm.tab10(i % 10), label=p, linewidth=1.4)
            axes[0].plot(xs, [100 * r["accuracy"] for r in rows], **style)
            axes[1].plot(xs, [r["loss_delta"] for r in rows], **style)
        axes[0].axhline(100 * m["full"]["accuracy"], color="black", linestyle="--", label="full cache")
        axes[1].axhline(0.0, color="black", linestyle="--", label="full cache")
        axes[0].set(xlabel="budget (% of prompt tokens)", ylabel="answers right (%)", ylim=(-5, 105),
                    title=f"{name}: retrieval accuracy ({m['full']['asked']} prompts)")
        axes[1].set(xlabel="budget (% of prompt tokens)", ylabel="loss − full-cache loss (nats/token)",
                    title=f"{name}: continuation loss increase")
        axes[1].set_yscale("symlog", linthresh=0.05)
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_xticks([100 * b for b in data["settings"]["budgets"]])
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9)
        fig.tight_layout()
        path = out / f"{stem(data['settings'])}_{_slug(name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- command line ----------------------------------------------------------------

def settings_from(args) -> Settings:
    suite = SUITES[args.suite]
    per_length = args.per_length or suite.get("per_length", 1)
    if args.quick:
        return Settings(models=tuple(args.models or [common.QUICK_MODEL]), policies=tuple(args.policies),
                        budgets=tuple(args.budgets or (0.5, 0.2)), lengths=(96, 160), depths=(0.5,),
                        loss_context=128, loss_tokens=32, loss_texts=1, seed=args.seed, inner=args.inner,
                        sum_queries=args.sum_queries, suite=args.suite, per_length=1)
    return Settings(models=tuple(args.models or common.REAL_MODELS), policies=tuple(args.policies),
                    budgets=tuple(args.budgets or common.BUDGETS), lengths=tuple(args.lengths or suite["lengths"]),
                    depths=(0.25, 0.75), loss_context=args.loss_context, loss_tokens=args.loss_tokens,
                    loss_texts=2 if args.suite == "standard" else 1, seed=args.seed, inner=args.inner,
                    sum_queries=args.sum_queries, suite=args.suite, per_length=per_length)


def stem(settings_or_suite) -> str:
    """File and doc-section name of a suite's results: quality, quality_retrieval."""
    suite = settings_or_suite if isinstance(settings_or_suite, str) else settings_or_suite["suite"]
    return "quality" if suite == "standard" else f"quality_{suite}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, two budgets (a smoke run)")
    common.add_common_arguments(parser, "comma-separated fractions in (0, 1)", "eager")
    parser.add_argument("--suite", choices=sorted(SUITES), default="standard",
                        help="standard: passkey, key-value and variable prompts at 512/1k tokens; retrieval: "
                             "multi-key retrieval (8 per length) and variable tracking (2) at 2k/4k tokens")
    parser.add_argument("--per-length", type=int, default=0, metavar="N",
                        help="retrieval suite: multi-key prompts per length, N // 4 variable chains (default 8)")
    parser.add_argument("--lengths", type=common.list_of(int), default=None,
                        help="prompt lengths in tokens (default: the suite's)")
    parser.add_argument("--loss-context", type=int, default=1024)
    parser.add_argument("--loss-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    common.add_sum_queries_argument(parser)
    args = parser.parse_args(argv)
    common.check_arguments(parser, args)
    common.check_sum_queries(parser, args)
    if args.per_length < 0:
        parser.error(f"--per-length={args.per_length}: must be >= 1 (or 0 for the suite's default)")
    settings = settings_from(args)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    data: dict[str, Any] = {"settings": dataclasses.asdict(settings), "machine": common.machine(), "models": {}}
    for name in settings.models:
        data["models"][name] = run_model(name, settings)
    data["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    name = stem(settings.suite)
    common.write_json(args.out / f"{name}.json", data)
    text = tables(data)
    (args.out / f"{name}.md").write_text(text)
    plot(data, args.out)
    if args.out.resolve() == common.RESULTS.resolve() and not args.quick:
        common.update_doc(name, text)
    common.progress(f"[quality] done in {data['seconds']:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
