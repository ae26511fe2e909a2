"""gpt2-spec's benchmarks: one suite, the machine's limits measured beside every number.

    python -m bench --quick                  # under two minutes on an idle 2-core machine
    python -m bench --out bench/results      # the full run, the committed figures (~10-15 min)
    gpt2 bench --suite ops --sizes 124M,1558M --backends ref,numba

Suites (bench/suite_*.py): `limits` (streaming-read and copy bandwidth, float32 matmul FLOP/s;
on a GPU also device bandwidth and fp32/bf16/fp16 matmul), `ops` (every op x backend x variant
x shape, forward and backward), `generate` (prefill and decode tokens/s, peak memory),
`finetune` (training-step tokens/s and peak memory, full and LoRA), `train` (pretraining
tokens/s from GPT-2's initialisation: a small config and, in full runs, the first model size,
against torch autograd). The harness
(bench/harness.py) does the warm-up, repeats, cache flushing and environment capture;
bench/workload.py holds the FLOP and byte counts; bench/ratios.py computes the ratios from the
records and bench/report.py writes report.md and the plots.

Outputs in --out (default ./bench-results/; the committed figures in bench/results/ change only
with an explicit --out bench/results): results.json, report.md, decode.png, ops_fraction.png.

results.json (schema "gpt2-spec-bench/1"), one object:
    schema        "gpt2-spec-bench/1"
    command       the command line that produced it
    mode          "full" | "quick" | "tiny"
    complete      false while the run is going (written after each suite), true at the end
    options       {suites, sizes, model_sizes, backends, baselines, seed}
    environment   {time_utc, python, platform, cpu_model, cpu_count, cpus_usable,
                   caches {L1d, L2, L3: bytes}, memory_bytes, load_average (at start),
                   env {OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE, OMP_NUM_THREADS, ...},
                   libraries {name: version or null}, git_commit}
    threads       {threadpools: threadpoolctl's BLAS/OpenMP pools in force, numba_threads,
                   numba_threading_layer, torch_threads} (read at the end, once all loaded)
    gpu           {name, memory_bytes, multiprocessors, capability, cuda} or null
    load_average_end  the load average when the run finished (noise: other processes); with
                  environment.load_average above environment.cpu_count (1 minute) at the start
                  or the end, the report says the machine was busy (bench.harness.busy_machine)
    elapsed_s     wall time of the run
    backends      {name: {status "ok" | "unavailable", reason, device, variants {op: [names]}}}
    limits        what every fraction uses: the higher of limits_start and limits_end, per
                  limit {read_GBps, copy_GBps, matmul_f32_GFLOPs[, gpu_read_GBps,
                  gpu_copy_GBps, gpu_matmul_f32_GFLOPs, gpu_matmul_bf16_GFLOPs,
                  gpu_matmul_fp16_GFLOPs]} (bench/limits.py); while the run goes, limits_start
    limits_start  the limits measured before the suites, each the best of plan.limit_tries
                  tries (a run before this field: `limits` is the start's)
    limits_end    the same, measured again after the suites (drift = noise)
    results       [record, ...]
    ratios        [{name, value, numerator, denominator, note, key, of_limit}, ...]; numerator
                  and denominator describe the records divided (or the limit used); key: one
                  of the ratios the Numba and GPU issues name; of_limit: a fraction of a
                  measured limit (above 1 the report marks it: the limit was under-measured)
    plots         file names of the PNGs written beside it

A record:
    suite         "limits" | "ops" | "generate" | "finetune" | "train"
    case          limits: read, copy, matmul, gpu_*; ops: the op name; generate: prefill,
                  decode; finetune, train: step
    backend       a fast.BACKENDS name, or a baseline: torch-native, ref-nocache,
                  torch-eager, hf-generate, torch-autograd (finetune, train),
                  hf-transformers (finetune, CUDA) (numpy for the limits)
    variant       the VARIANTS name (ops), else ""
    params        what was measured: limits {bytes | n, phase "start" | "end"}; ops {size,
                  the shape (N, C, H, V, n_ctx | B, NH, Tq, Tk, hs), pass, device}; pass is
                  "forward", "backward" or "forward+backward" (one timed call); the GPU-only cases
                  (bench.suite_ops.gpu_cases) add dtype ("float32" | "bfloat16");
                  prefill {size, device, dtype, B, T}; decode
                  {size, device, dtype, B, ctx, contexts [lo, hi]: keys attended by the
                  timed steps}; finetune {size, device, train, B, T, lora_rank}; train
                  {size ("mini" | "tiny" | a model size), n_layer, n_head, n_embd, n_vocab,
                  device, train "all", B, T}
    status        "ok" | "error" | "unavailable"; reason: one line when not ok
    time_s        {min, median, n (timed repeats), warmup (untimed calls)} in seconds, or null
    cache         ops: "flushed" (working set < 4 x LLC, on a GPU 4 x its L2: the cache is
                  rewritten before each call) | "exceeds-llc" | "device-not-flushed" (a GPU
                  run without a flusher)
    metrics       limits {GBps | GFLOPs: the best try, tries [the rate of every try]}; ops
                  {flops, read_bytes, write_bytes, GBps, GFLOPs, roofline_s, bound,
                  fraction_of_limit}; prefill {tokens_per_s, flops, GFLOPs,
                  fraction_of_matmul, peak_rss_bytes, rss_before_bytes}; decode
                  {tokens_per_s, bytes_per_step, ceiling_tokens_per_s, fraction_of_ceiling,
                  peak_rss_bytes, rss_before_bytes}; finetune and train {tokens_per_s, flops,
                  GFLOPs, peak_rss_bytes, rss_before_bytes}; on a GPU also peak_gpu_bytes (ops:
                  forward and forward+backward records, with gpu_bytes_before)
Rates use the min time (the best the machine did); the median shows the noise.
"""
