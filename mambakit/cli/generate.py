"""`mambakit generate`: text from a checkpoint, streamed to the terminal (argparse only; see mambakit.generate)."""

from __future__ import annotations

import sys

from ._common import add_model_args, load_model


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint (streams to the terminal)")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text (a literal \\n is a newline)")
    src.add_argument("--prompt-file", help="a file with one prompt per line (generated as one batch)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (MambaLM.step)")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="leave the weights in ordinary pages (default: moved into 2 MiB pages for decoding)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    try:
        return _generate(args)
    except KeyboardInterrupt:  # Ctrl-C stops a generation: no traceback, the exit code of an interrupt
        print("\nmambakit generate: interrupted", file=sys.stderr)
        return 130


def _generate(args) -> int:
    from ..engine import use_huge_pages
    from ..generate import generate

    model = load_model(args, need_tokenizer=True)
    if not args.no_huge_pages:
        use_huge_pages(model)  # decoding streams every weight each step: 2 MiB pages read faster
    if args.prompt is not None:
        prompts = [args.prompt.replace("\\n", "\n")]
    else:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompt_file} has no prompts (one per line)")
    gen = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                   seed=args.seed, stream=True, compile=args.compile)
    out = sys.stdout
    single = len(prompts) == 1
    if single:
        out.write(prompts[0])
        out.flush()
    texts = [""] * len(prompts)
    for step in gen:
        for i, piece in enumerate(step.texts):
            if single:  # stream the text as it comes
                out.write(piece)
                out.flush()
                continue
            texts[i] += piece  # a batch: print each row whole when it ends
            if step.finished[i] and step.token_ids[i] is not None:
                out.write(f"--- [{i}]\n{prompts[i]}{texts[i]}\n")
                out.flush()
    result = gen.output
    out.write("\n" if single else "")
    n = sum(len(s) for s in result.sequences)
    rate = result.decode_steps * len(prompts) / result.decode_seconds if result.decode_seconds > 0 else float("nan")
    print(f"[{n} tokens; prefill {result.prefill_seconds:.2f} s; decode {result.decode_steps} steps in "
          f"{result.decode_seconds:.2f} s ({rate:.1f} tok/s); finish: {', '.join(result.finish_reasons)}]",
          file=sys.stderr)
    return 0
