"""Load test of `mambakit serve` on loopback: requests/s, tokens/s and latency at 1, 8, 32 concurrent clients.

The server runs in a child process (the 130m shape with random weights by default: no download, no
tokenizer, prompts are token ids and every request runs to max_tokens); this process runs the clients,
each sending one request after another (closed loop) with asyncio + httpx. Each level is bounded in time
and in requests. The claim checked: continuous batching makes tokens/s at 32 clients >= 5x tokens/s at 1
client (target in issue 9).

    python benchmarks/serve_load.py                       # 130m, prompt 32, 128 new tokens, levels 1 8 32
    python benchmarks/serve_load.py --preset tiny --seconds 5 --clients 1 4     # a quick look
    python benchmarks/serve_load.py --step-cost           # also: the engine's step time per batch size (in-process)

tokens/CPU-s is tokens per CPU-second the server process used: on a shared machine, where the wall-clock
rates depend on what else runs, it shows the batching gain on its own. "fused steps" is the share of the
engine's decode steps during the level that took the fused CPU step (the server's /health counters).

--step-cost measures why the engine steps only the active slots (the first k rows of the pool) rather
than the whole pool: a step of k rows against a step of all max_batch rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mambakit command sets it (mambakit/cli), before torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(preset: str, seed: int):
    import torch

    from mambakit import MambaConfig, MambaLM

    torch.manual_seed(seed)
    return MambaLM(MambaConfig.from_preset(preset)).eval()


# ---------------------------------------------------------------------------------------- server side
def run_server(args) -> None:
    """Child process: builds the model and serves it until killed; writes its URL to args.url_file."""
    import torch

    from mambakit.serve import Limits, start_server

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.preset, args.seed)
    handle = start_server(model, max_batch=args.max_batch, max_queue=256, model_name=args.preset,
                          limits=Limits(max_tokens=100_000, max_prompt_tokens=100_000))
    tmp = args.url_file + ".tmp"
    Path(tmp).write_text(handle.url)
    os.replace(tmp, args.url_file)
    try:
        while True:
            time.sleep(3600)
    finally:
        handle.stop()


# ---------------------------------------------------------------------------------------- client side
async def level(url: str, clients: int, args, vocab: int) -> dict:
    """`clients` closed-loop clients for at most args.seconds (and args.max_requests requests in all)."""
    import httpx

    rng = random.Random(clients)
    latencies, ttfts, tokens, errors = [], [], 0, 0
    started = 0
    deadline = time.perf_counter() + args.seconds

    async def client(c: httpx.AsyncClient):
        nonlocal tokens, errors, started
        while time.perf_counter() < deadline and started < args.max_requests:
            started += 1
            prompt = [rng.randrange(vocab) for _ in range(args.prompt_tokens)]
            body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "seed": rng.randrange(2**31)}
            t0 = time.perf_counter()
            if args.stream:  # Server-Sent Events: time to the first token, then the whole response
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors += 1
                        await r.aread()
                        await asyncio.sleep(0.05)
                        continue
                    first, usage = None, None
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            first = first or time.perf_counter() - t0
                            usage = json.loads(line[6:]).get("usage") or usage
                ttfts.append(first)
                tokens += usage["completion_tokens"]
            else:
                r = await c.post("/v1/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    await asyncio.sleep(0.05)
                    continue
                tokens += r.json()["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    def pct(values, p):
        q = sorted(values)
        return q[min(len(q) - 1, int(round(p / 100 * (len(q) - 1))))] if q else float("nan")

    return dict(clients=clients, requests=len(latencies), errors=errors, seconds=elapsed,
                req_per_s=len(latencies) / elapsed, tokens_per_s=tokens / elapsed,
                p50_s=pct(latencies, 50), p99_s=pct(latencies, 99),
                ttft_p50_s=pct(ttfts, 50), ttft_p99_s=pct(ttfts, 99))


def engine_steps(url: str) -> tuple[int, int]:
    """(decode steps, of which fused) the server's engine has run so far (its /health counters)."""
    import httpx

    stats = httpx.get(url + "/health", timeout=30).json()
    return stats.get("steps", 0), stats.get("fused_steps", 0)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used: /proc/PID/stat fields 14 and 15."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def step_cost(args) -> list[dict]:
    """ms per decode step for b busy slots, as the engine runs it: its step function (the fused step where it
    applies) on the first b rows of a pool of max_batch slots."""
    import torch

    from mambakit.engine import step_function

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.preset, args.seed)
    step = step_function(model)
    pool = model.allocate_state(args.max_batch)
    rows = []
    with torch.inference_mode():
        for b in sorted({1, 2, 4, 8, 16, args.max_batch}):
            state = type(pool)(pool.conv[:, :b], pool.ssm[:, :b])  # the engine's view of its first b slots
            ids = torch.zeros(b, dtype=torch.long)
            for _ in range(3):
                step(ids, state)
            times = []
            for _ in range(args.step_reps):
                t0 = time.perf_counter()
                step(ids, state)
                times.append(time.perf_counter() - t0)
            rows.append(dict(batch=b, ms_per_step=1000 * statistics.median(times), path=step.last))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="130m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--stream", action="store_true", help="stream (SSE) and report the time to the first token")
    ap.add_argument("--seconds", type=float, default=40.0, help="time bound per level (requests in flight finish)")
    ap.add_argument("--max-requests", type=int, default=200, help="request bound per level")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the levels (medians reported)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's slots")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-cost", action="store_true", help="also time the engine's decode step per batch size")
    ap.add_argument("--step-reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.server:
        return run_server(args)

    from mambakit import MambaConfig

    vocab = MambaConfig.from_preset(args.preset).vocab_size
    results = {"args": vars(args), "load": os.getloadavg(), "levels": []}
    if args.step_cost:
        results["step_cost"] = step_cost(args)
        print("step cost (in-process):", ", ".join(f"b={r['batch']}: {r['ms_per_step']:.1f} ms ({r['path']})"
                                                    for r in results["step_cost"]))
    with tempfile.TemporaryDirectory() as tmp:
        url_file = os.path.join(tmp, "url")
        cmd = [sys.executable, __file__, "--server", "--url-file", url_file, "--preset", args.preset,
               "--max-batch", str(args.max_batch), "--seed", str(args.seed)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        server = subprocess.Popen(cmd)
        try:
            t0 = time.time()
            while not os.path.exists(url_file):
                if server.poll() is not None or time.time() - t0 > 300:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            url = Path(url_file).read_text()
            assert url.startswith("http://127.0.0.1:"), url  # loopback only
            print(f"server {url} ({args.preset}, random weights, {args.max_batch} slots); prompt "
                  f"{args.prompt_tokens} tokens, {args.max_tokens} new tokens, load average {os.getloadavg()[0]:.1f}")
            asyncio.run(level(url, 1, argparse.Namespace(**{**vars(args), "seconds": 3, "max_requests": 2}), vocab))
            print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} "
                  f"{'errors':>6} {'tokens/CPU-s':>11} {'fused steps':>11}"
                  + (f" {'TTFT p50':>9} {'TTFT p99':>9}" if args.stream else ""))
            runs: dict[int, list[dict]] = {c: [] for c in args.clients}
            for rep in range(args.repeat):  # levels interleaved: a change in machine load hits all of them
                for c in args.clients:
                    cpu0, (steps0, fused0) = cpu_seconds(server.pid), engine_steps(url)
                    r = asyncio.run(level(url, c, args, vocab))
                    r["server_cpu_s"] = cpu_seconds(server.pid) - cpu0
                    steps1, fused1 = engine_steps(url)
                    r["fused_step_share"] = (fused1 - fused0) / max(steps1 - steps0, 1)  # the engine's fused steps
                    r["tokens_per_cpu_s"] = r["tokens_per_s"] * r["seconds"] / max(r["server_cpu_s"], 1e-9)
                    runs[c].append(r)
                    print(f"{c:>7} {r['requests']:>8} {r['req_per_s']:>7.2f} {r['tokens_per_s']:>9.1f} "
                          f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {r['errors']:>6} {r['tokens_per_cpu_s']:>11.1f}"
                          f" {r['fused_step_share']:>10.0%}"
                          + (f" {r['ttft_p50_s']:>9.2f} {r['ttft_p99_s']:>9.2f}" if args.stream else "")
                          + (f"   (round {rep + 1})" if args.repeat > 1 else ""), flush=True)
        finally:
            server.terminate()
            server.wait(30)
    for c, rs in runs.items():  # per level: the run with the median tokens/s
        results["levels"].append(sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2] | {"runs": rs})
    if args.repeat > 1:
        print("medians:", ", ".join(f"{r['clients']} clients {r['tokens_per_s']:.1f} tokens/s"
                                    for r in results["levels"]))
    by = {r["clients"]: r["tokens_per_s"] for r in results["levels"]}
    if 1 in by and max(by) > 1:
        top = max(by)
        results["ratio"] = by[top] / by[1]
        print(f"tokens/s at {top} clients / at 1 client: {results['ratio']:.1f}x (target >= 5x at 32)")
        cpu = {r["clients"]: r["tokens_per_cpu_s"] for r in results["levels"]}
        results["cpu_ratio"] = cpu[top] / cpu[1]
        print(f"tokens per server CPU-second at {top} clients / at 1 client: {results['cpu_ratio']:.1f}x "
              "(the batching gain without the other processes' share of the cores)")
    results["load_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
