"""Run every difnumpy benchmark and print one summary table of the headline figures against their goals.

    python benchmarks/run_all.py [--quick] [--threads N] [--json OUT] [--only NAME ...]

Benchmarks (each also runs alone; see benchmarks/README.md): bench_forward (q_sample vs copy bandwidth),
bench_train (training / forward images/s vs PyTorch, conv GFLOP/s vs SGEMM), bench_sample (DDPM / DDIM
sampling images/s vs PyTorch, DDIM-50 vs DDPM-1000 speedup, loop overhead), bench_scaling (log-log cost vs
batch, image size and steps, PNG), bench_memory (peak RSS vs the arrays that must exist) and bench_cuda
(only when a CUDA GPU is present and benchmarks/bench_cuda.py exists). Each is imported and its
``main(argv)`` called in this process, in that order; ``--quick``, ``--smoke`` and ``--threads`` are
passed on to each script that declares them. A benchmark that
fails is reported as ERROR and the others still run (the exit status is then 1). The combined JSON
(machine, every benchmark's returned results, the summary) is written atomically.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import machine_info, print_table, write_json  # noqa: E402

ORDER = ["forward", "train", "sample", "scaling", "memory", "cuda"]


def gpu_present() -> bool:
    """True when numba sees a usable CUDA GPU (never raises)."""
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001  (no driver, no toolkit, ...)
        return False


def _line(bench, figure, value, goal=None, ok=None, note=""):
    status = "-" if ok is None else ("met" if ok else "NOT met")
    return {"benchmark": bench, "figure": figure, "value": value, "goal": goal or "-", "status": status,
            "note": note}


# ----------------------------------------------------------------------------- headline extraction
def summarize_forward(res):
    rows = res if isinstance(res, list) else res.get("rows", [])
    out = []
    at = [r for r in rows if r.get("elements") == 10 ** 7]
    if at:
        v = at[0]["numba_vs_copy"]
        out.append(_line("forward", "q_sample numba / copy bandwidth @1e7", v, ">= 0.80", v >= 0.8))
    elif rows:
        r = rows[-1]
        out.append(_line("forward", f"q_sample numba / copy bandwidth @{r['elements']:.0e}", r["numba_vs_copy"],
                         ">= 0.80 @1e7", None, "1e7 not measured"))
    return out


def summarize_train(res):
    rows, conv = (res if isinstance(res, tuple) else (res.get("model", res.get("rows", [])), res.get("conv", [])))
    out = []
    for r in rows:
        if "cpu/torch" in r:
            v = r["cpu/torch"]
            out.append(_line("train", f"{r['phase']} {r['size']} numba / torch img/s", v, ">= 1.0", v >= 1.0))
        elif "cpu" in r:
            out.append(_line("train", f"{r['phase']} {r['size']} numba img/s", r["cpu"], None, None,
                             "torch not installed"))
    for r in conv:
        out.append(_line("train", f"conv {r['layer']} fwd / SGEMM GFLOP/s", r["fwd/sgemm"]))
    return out


def summarize_sample(res):
    rows, s = res["rows"], res["summary"]
    out = []
    ext = " (DDPM extrapolated)" if s.get("ddpm_extrapolated") else ""
    if "cpu_ddim50_vs_ddpm1000_speedup" in s:
        v = s["cpu_ddim50_vs_ddpm1000_speedup"]
        out.append(_line("sample", "DDIM-50 vs DDPM-1000 wall-clock speedup", v, ">= 19 (ideal 20)", v >= 19.0,
                         ext.strip()))
    if "cpu_ddim50_vs_ddpm1000_speedup_median_step" in s:
        out.append(_line("sample", "  same, from median step times", s["cpu_ddim50_vs_ddpm1000_speedup_median_step"],
                         None, None, "noise-robust cross-check"))
    out.append(_line("sample", "  same, predicted from model + loop parts", s["predicted_speedup"], None, None,
                     "1000 (m + o_ddpm) / 50 (m + o_ddim)"))
    out.append(_line("sample", "loop overhead / step cost (DDPM)", s["ddpm_overhead_fraction"], None, None,
                     "zero-cost model vs network forward"))
    for r in rows:
        if r["impl"] == "cpu" and "cpu/torch" in r:
            v = r["cpu/torch"]
            out.append(_line("sample", f"{r['method']}-{r['steps']} numba / torch img/s (batch {r['batch']})", v,
                             ">= 1.0", v >= 1.0, "extrapolated" if r["extrapolated"] else ""))
    return out


def summarize_scaling(res):
    return [_line("scaling", f"log-log slope {k}", v, None, None,
                  {"batch": "ideal 1", "size": "ideal 2", "steps": "ideal 1"}[k.split("_")[0].split(">")[0]])
            for k, v in res["slopes"].items() if v is not None]


def summarize_memory(res):
    return [_line("memory", f"peak RSS / required, {r['kind']} batch {r['batch']}", r["ratio"], "<= 2",
                  r["ratio"] <= 2.0) for r in res["rows"]]


def summarize_generic(name, res):
    return [_line(name, "ran", None, None, None, "see its own table")]


SUMMARIZERS = {"forward": summarize_forward, "train": summarize_train, "sample": summarize_sample,
               "scaling": summarize_scaling, "memory": summarize_memory}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--smoke", action="store_true", help="tiniest settings where supported (tests only)")
    ap.add_argument("--threads", type=int, default=None, help="pass --threads N to the benchmarks taking it")
    ap.add_argument("--only", nargs="+", choices=ORDER, default=None, help="run only these benchmarks")
    ap.add_argument("--json", default=None, help="write the combined results here (atomically)")
    args = ap.parse_args(argv)
    names = [n for n in ORDER if args.only is None or n in args.only]
    if "cuda" in names and not (os.path.exists(os.path.join(HERE, "bench_cuda.py")) and gpu_present()):
        print("# bench_cuda skipped (no CUDA GPU or no bench_cuda.py)")
        names.remove("cuda")
    results, summary, errors, wall = {}, [], {}, {}
    for name in names:
        t0 = time.perf_counter()
        argv_b = []
        try:
            mod = importlib.import_module(f"bench_{name}")
            # pass on only the flags the script declares (bench_cuda, owned elsewhere, may lack some)
            src = inspect.getsource(mod)
            if (args.quick or (args.smoke and '"--smoke"' not in src)) and '"--quick"' in src:
                argv_b.append("--quick")
            if args.smoke and '"--smoke"' in src:
                argv_b.append("--smoke")
            if args.threads is not None and '"--threads"' in src:
                argv_b += ["--threads", str(args.threads)]
            if args.smoke and name == "scaling":
                argv_b.append("--no-plot")
            print(f"\n=============== bench_{name} {' '.join(argv_b)}", flush=True)
            res = mod.main(argv_b)
            results[name] = res
            summary += SUMMARIZERS.get(name, lambda r: summarize_generic(name, r))(res)
        except (Exception, SystemExit) as exc:  # noqa: BLE001  (one failure must not hide the others)
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            summary.append(_line(name, "ERROR", None, None, False, errors[name][:80]))
        wall[name] = time.perf_counter() - t0
    info = machine_info()
    print(f"\n=============== summary  ({info['cpu']}, {info['cores']} cores; numpy {info['numpy']}, "
          f"numba {info['numba']}, torch {info['torch']}; threads {info['threads']})")
    heads = ["benchmark", "figure", "value", "goal", "status", "note"]
    print_table([[r[h] for h in heads] for r in summary], heads)
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()))
    if args.json:
        write_json(args.json, {"machine": info, "argv": list(argv or sys.argv[1:]), "summary": summary,
                               "results": results, "errors": errors, "wall_s": wall})
    return {"summary": summary, "results": results, "errors": errors, "wall_s": wall}


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
