"""GPU sweep of the opt-in knobs of schedules/cuda_tc.py (one_sync, q_hoist / q_in_regs, lazy_rescale,
smem_epilogue) against SDPA's flash backend.

Run on the H100 from the repo root:   python3 benchmarks/sweep_opt_knobs.py            (about 2-3 minutes)
Options: --only hd128nc,hd128c,hd64nc   --combos 1,5,7 (numbers as printed)   --rep 200 (ms per timing)
Needs torch (CUDA), triton (do_bench) and TVM + the repo on PYTHONPATH (the repo root is added).

Cases: bf16, B=4, S=4096 (16k tokens), hidden 2048: hd128 non-causal, hd128 causal, hd64 non-causal.
Per combo: compile (tvm.compile -> NVRTC), correctness, timing.
  correctness: o / lse poisoned with NaN; one (batch, head) slice checked against a float64 reference,
  error must be <= 2x SDPA's error on the same slice (+1e-5); no NaN anywhere in o / lse; LSE checked;
  plus a small GQA + ragged-tail shape (B=1, Hq=4, Hkv=2, Sq=1000, Sk=1000) fully checked.
  timing: triton.testing.do_bench(return_mode="median"), SDPA-flash timed in the same process.
Each case runs in a child process, so a kernel that faults (sticky CUDA error) only loses that combo:
the parent restarts a child after it.  A failing combo prints FAIL / ERROR / CRASH and the sweep goes on.
"""

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_S = 90  # a child silent this long is killed (hung kernel); its combo is reported as CRASH

BASE32 = dict(block_m=128, block_n=32, num_warps=4, num_stages=2)
BASE64 = dict(block_m=128, block_n=64, num_warps=4, num_stages=2)
OS = dict(one_sync=True)
QH = dict(q_hoist=True)
QR = dict(q_in_regs=True)
LZ = dict(lazy_rescale=True)
EP = dict(smem_epilogue=True)


def K(*ds):
    out = {}
    for d in ds:
        out.update(d)
    return out


# (case, head_dim, causal, [(label, knobs), ...]); 16 combos in all, the first of each case = today's default
CASES = [
    ("hd128nc", 128, False, [
        ("default 128x32", K(BASE32)),
        ("128x32 one_sync", K(BASE32, OS)),
        ("128x32 q_in_regs", K(BASE32, QR)),
        ("128x32 q_hoist", K(BASE32, QH)),
        ("128x32 q_hoist+one_sync", K(BASE32, QH, OS)),
        ("128x32 q_hoist+one_sync+lazy", K(BASE32, QH, OS, LZ)),
        ("128x32 q_hoist+one_sync+lazy+epi", K(BASE32, QH, OS, LZ, EP)),
        ("128x32 q_in_regs+one_sync+lazy+epi", K(BASE32, QR, OS, LZ, EP)),
        ("128x64 one_sync+lazy+epi", K(BASE64, OS, LZ, EP)),
        ("128x32 s3 q_hoist+one_sync+lazy+epi", K(BASE32, QH, OS, LZ, EP, dict(num_stages=3))),
    ]),
    ("hd128c", 128, True, [
        ("default 128x64", K(BASE64)),
        ("128x64 one_sync+lazy+epi", K(BASE64, OS, LZ, EP)),
        ("128x32 q_hoist+one_sync+lazy+epi", K(BASE32, QH, OS, LZ, EP)),
    ]),
    ("hd64nc", 64, False, [
        ("default 128x64", K(BASE64)),
        ("128x64 q_hoist+one_sync+lazy+epi", K(BASE64, QH, OS, LZ, EP)),
        ("128x32 q_hoist+one_sync+lazy+epi", K(BASE32, QH, OS, LZ, EP)),
    ]),
]


def child(case_name, start, combo_filter, rep):
    sys.path.insert(0, REPO)
    import torch
    import torch.nn.functional as F
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tvm_flash.build import Workload, compile_kernel, make_target

    case = next(c for c in CASES if c[0] == case_name)
    _, hd, causal, combos = case
    dtype, tdt = "bfloat16", torch.bfloat16
    seq, H = 4096, 2048 // hd
    B = 16384 // seq
    scale = 1.0 / math.sqrt(hd)
    flops = 4 * B * H * seq * seq * hd / (2 if causal else 1)
    target = make_target("cuda", "sm_90")
    torch.manual_seed(0)
    q = torch.randn(B, H, seq, hd, device="cuda", dtype=tdt)
    k = torch.randn(B, H, seq, hd, device="cuda", dtype=tdt)
    v = torch.randn(B, H, seq, hd, device="cuda", dtype=tdt)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, seq, device="cuda", dtype=torch.float32)

    def bench(fn):
        try:
            return tt.do_bench(fn, warmup=25, rep=rep, return_mode="median")
        except TypeError:
            return tt.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5])

    def ref(qs, ks, vs, caus):  # [Sq, D], [Sk, D] float64
        s = (qs.double() @ ks.double().T) * scale
        if caus:
            s = s.masked_fill(~torch.ones(s.shape, dtype=torch.bool, device=s.device).tril(), float("-inf"))
        return torch.softmax(s, -1) @ vs.double(), torch.logsumexp(s, -1)

    def sdpa(qq, kk, vv, caus):
        rep_ = qq.shape[1] // kk.shape[1]
        kk, vv = kk.repeat_interleave(rep_, 1), vv.repeat_interleave(rep_, 1)
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=caus, scale=scale)

    def check(fn, qq, kk, vv, b, h):
        oo = torch.full_like(qq, float("nan"))
        ll = torch.full(qq.shape[:3], float("nan"), device="cuda", dtype=torch.float32)
        fn(qq, kk, vv, oo, ll, scale)
        torch.cuda.synchronize()
        nan = bool(torch.isnan(oo).any().item() or torch.isnan(ll).any().item())
        hk = h // (qq.shape[1] // kk.shape[1])
        o_ref, l_ref = ref(qq[b, h], kk[b, hk], vv[b, hk], causal)
        o_pt = sdpa(qq, kk, vv, causal)[b, h]
        err = (oo[b, h].double() - o_ref).abs().max().item()
        err_pt = (o_pt.double() - o_ref).abs().max().item()
        lerr = (ll[b, h].double() - l_ref).abs().max().item()
        ok = (not nan) and err <= 2 * err_pt + 1e-5 and lerr <= 1e-3 * (1 + l_ref.abs().max().item())
        return ok, err, err_pt, nan

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms_fa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))
    print(json.dumps({"sdpa": case_name, "ms": ms_fa, "tf": flops / ms_fa * 1e-9}), flush=True)

    for i in range(start, len(combos)):
        label, knobs = combos[i]
        if combo_filter and f"{case_name}:{i}" not in combo_filter:
            continue
        rec = {"case": case_name, "i": i, "label": label, "knobs": knobs}
        print(json.dumps({"begin": i}), flush=True)
        try:
            t = time.time()
            fn = compile_kernel(Workload(hd, dtype, causal), target, knobs)["flash_fwd"]
            rec["compile_s"] = round(time.time() - t, 1)
            ok1, err, err_pt, nan = check(fn, q, k, v, B - 1, H // 2)
            torch.manual_seed(1)
            qs = torch.randn(1, 4, 1000, hd, device="cuda", dtype=tdt)
            ks = torch.randn(1, 2, 1000, hd, device="cuda", dtype=tdt)
            vs = torch.randn(1, 2, 1000, hd, device="cuda", dtype=tdt)
            ok2, err2, err_pt2, nan2 = check(fn, qs, ks, vs, 0, 3)
            rec.update(ok=ok1 and ok2, err=err, err_sdpa=err_pt, err_tail=err2, err_tail_sdpa=err_pt2, nan=nan or nan2)
            ms = bench(lambda: fn(q, k, v, o, lse, scale))
            rec.update(ms=ms, tf=flops / ms * 1e-9, ratio=ms_fa / ms)
        except Exception as e:  # report and go on
            rec["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            try:
                torch.cuda.synchronize()
            except Exception:  # sticky CUDA error: this process is done, the parent restarts after i
                print(json.dumps(rec), flush=True)
                sys.exit(3)
        print(json.dumps(rec), flush=True)


def fmt(rec, tf_fa):
    head = f"  [{rec['i']:2d}] {rec['label']:<38s}"
    if "error" in rec:
        return f"{head} ERROR {rec['error']}"
    if "crash" in rec:
        return f"{head} CRASH (child died: {rec['crash']})"
    if "ms" not in rec:
        return f"{head} ERROR (incomplete)"
    st = "ok  " if rec["ok"] else ("FAIL(NaN)" if rec["nan"] else "FAIL")
    return (f"{head} {st} {rec['ms']:7.3f} ms {rec['tf']:6.1f} TF/s  x{rec['tf'] / tf_fa:.3f} vs SDPA  "
            f"err {rec['err']:.1e} (sdpa {rec['err_sdpa']:.1e}) tail {rec['err_tail']:.1e} (sdpa {rec['err_tail_sdpa']:.1e})"
            f"  [build {rec.get('compile_s', 0)}s]")


def main():
    args = sys.argv[1:]
    def opt(name, default=None):
        return args[args.index(name) + 1] if name in args else default
    rep = int(opt("--rep", "100"))
    if "--child" in args:
        filt = set(filter(None, opt("--filter", "").split(",")))
        child(opt("--child"), int(opt("--start", "0")), filt, rep)
        return
    only = set(filter(None, opt("--only", "").split(",")))
    combos_sel = set(filter(None, opt("--combos", "").split(",")))
    t0 = time.time()
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    try:
        import torch
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    except Exception:
        pass
    summary = []
    for case_name, hd, causal, combos in CASES:
        if only and case_name not in only:
            continue
        filt = ",".join(f"{case_name}:{c}" for c in combos_sel) if combos_sel else ""
        print(f"\n== {case_name}: bf16 B={16384 // 4096} H={2048 // hd} S=4096 D={hd} causal={int(causal)}", flush=True)
        results, tf_fa, start = {}, None, 0
        while start < len(combos):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", case_name, "--start", str(start),
                   "--rep", str(rep)] + (["--filter", filt] if filt else [])
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
            lines = queue.Queue()
            threading.Thread(target=lambda: ([lines.put(l) for l in p.stdout], lines.put(None)), daemon=True).start()
            errbuf = []
            threading.Thread(target=lambda: errbuf.extend(p.stderr), daemon=True).start()
            last_begin, hung = None, False
            while True:
                try:
                    line = lines.get(timeout=HANG_S)
                except queue.Empty:  # no output for HANG_S seconds: a hung kernel (or a stuck build)
                    p.kill()
                    hung = True
                    break
                if line is None:
                    break
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "sdpa" in rec:
                    if tf_fa is None:
                        tf_fa = rec["tf"]
                        print(f"  SDPA-flash                                    {rec['ms']:7.3f} ms {rec['tf']:6.1f} TF/s", flush=True)
                elif "begin" in rec:
                    last_begin = rec["begin"]
                else:
                    results[rec["i"]] = rec
                    print(fmt(rec, tf_fa or float("nan")), flush=True)
            p.wait()
            if p.returncode == 0 and not hung:
                break
            if last_begin is None:  # died before its first combo (imports, SDPA): give up on this case
                tail = "".join(errbuf).strip().splitlines()
                print(f"  child failed: {'hung' if hung else (tail[-1] if tail else p.returncode)}", flush=True)
                break
            if last_begin not in results:
                tail = "".join(errbuf).strip().splitlines()
                why = f"no output for {HANG_S}s, killed" if hung else (tail[-1] if tail else f"exit {p.returncode}")
                results[last_begin] = {"i": last_begin, "label": combos[last_begin][0], "crash": why}
                print(fmt(results[last_begin], tf_fa or float("nan")), flush=True)
            start = last_begin + 1
        good = [r for r in results.values() if r.get("ok") and "ms" in r]
        if good and tf_fa:
            best = max(good, key=lambda r: r["tf"])
            summary.append((case_name, best, tf_fa))
            print(f"  BEST {case_name}: [{best['i']}] {best['label']}  {best['tf']:.1f} TF/s = x{best['tf'] / tf_fa:.3f} SDPA-flash "
                  f"({tf_fa:.1f})  knobs {best['knobs']}", flush=True)
    print("\nsummary (best correct combo per case):")
    for case_name, best, tf_fa in summary:
        print(f"  {case_name:<8s} {best['tf']:6.1f} TF/s  x{best['tf'] / tf_fa:.3f} SDPA-flash ({tf_fa:.1f})  {best['label']}")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
