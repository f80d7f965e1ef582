"""`mambakit eval`: perplexity of a text file, or lm-evaluation-harness tasks (argparse only; see mambakit.eval)."""

from __future__ import annotations

import json
from pathlib import Path

from ._common import add_model_args, check_positive, load_model, set_threads


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a text file, or lm-evaluation-harness tasks")
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ppl", metavar="FILE", help="a UTF-8 text file: perplexity, nats/token, bits/byte")
    what.add_argument("--tasks", help="lm-eval task names, comma-separated (needs the eval extra)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding windows of W tokens (default: stateful, every token sees all before it); with "
                        "--tasks: for rolling log-likelihood (perplexity) tasks, other tasks are refused")
    p.add_argument("--stride", type=int, default=None, help="with --window: tokens between windows (default W // 2)")
    p.add_argument("--chunk-tokens", type=int, default=2048, help="positions per forward call and row")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--include-path", default=None, help="--tasks: a directory of extra task YAML files")
    p.add_argument("--only-included", action="store_true",
                   help="--tasks: all tasks are in --include-path (skip indexing lm_eval's own tasks)")
    p.add_argument("--limit", type=float, default=None, help="--tasks: examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples per prompt")
    p.add_argument("--seed", type=int, default=None, help="--tasks: lm_eval's seeds (default 1234)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from .._io import atomic_write
    from ..eval import check_window, evaluate_tasks, perplexity, progress_bar

    set_threads(args)
    check_positive(args, "chunk_tokens", "batch_size")
    if args.ppl is not None:  # options of --tasks alone: refused rather than ignored
        given = [f"--{n.replace('_', '-')}" for n in ("include_path", "limit", "num_fewshot", "seed")
                 if getattr(args, n) is not None] + (["--only-included"] if args.only_included else [])
        if given:
            raise ValueError(f"{', '.join(given)} apply to --tasks only, not to --ppl")
    else:
        if args.limit is not None and not args.limit > 0:
            raise ValueError(f"--limit must be > 0 (examples per task, or a fraction of them), got {args.limit}")
        if args.num_fewshot is not None and args.num_fewshot < 0:
            raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
        if args.only_included and not args.include_path:
            raise ValueError("--only-included needs --include-path (there would be no tasks at all)")
    try:
        check_window(args.window, args.stride)
    except ValueError as e:
        raise ValueError(f"--window/--stride: {e}") from None
    model = load_model(args)
    tok = model.tokenizer
    if args.ppl is not None:
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer.json: pass --tokenizer PATH (or --tokenizer byte)")
        path = Path(args.ppl)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None
        if not text:
            raise ValueError(f"{path} is empty")
        eos = getattr(tok, "eos_token_id", None)
        prefix = eos if eos is not None and eos < model.config.vocab_size else None
        result = perplexity(model, tok.encode(text), prefix_token_id=prefix, window=args.window, stride=args.stride,
                            chunk_tokens=args.chunk_tokens, batch_size=args.batch_size,
                            num_bytes=len(text.encode("utf-8")),
                            progress=progress_bar("perplexity", enabled=not args.quiet))
        result = {"file": str(path), **result}
        bpb = f", {result['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in result else ""
        print(f"{path}: {result['tokens']} tokens ({result['mode']}): perplexity {result['perplexity']:.4f}, "
              f"{result['nats_per_token']:.4f} nats/token{bpb} [{result['seconds']:.1f} s]")
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError("--tasks needs at least one task name")
        out = evaluate_tasks(model, tasks, include_path=args.include_path, include_defaults=not args.only_included,
                             limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                             seed=1234 if args.seed is None else args.seed, chunk_tokens=args.chunk_tokens,
                             window=args.window, stride=args.stride, progress=not args.quiet)
        result = {"tasks": out["results"], "n_samples": out.get("n-samples"), "config": {
            k: v for k, v in out.get("config", {}).items() if isinstance(v, (int, float, str, type(None)))}}
        for task, metrics in out["results"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {shown}")
    if args.output:
        atomic_write(args.output, json.dumps(result, indent=2, default=str))
    return 0
