//! End-to-end checks and benchmarks of the CUDA engine (run on the GPU machine):
//!
//!     engine check --model DIR --cases CASES.json --out LOGITS.f32 [--together] [--dtype f32]
//!         For each case, prefill its prompt ids and then feed its reference tokens one decode
//!         step at a time (teacher forcing), writing every step's f32 logits (raw, little-endian,
//!         case-major) for the comparison script (scripts/gpu_e2e.py). `--together`: all cases
//!         in each step's batch (multi-row decode) instead of one case after another.
//!         `--dtype f32`: the model in f32 instead of bf16 (the precision whose greedy picks
//!         a random-weight model's near-flat logits still decide).
//!     engine bench --model DIR [--prompt-len 512] [--gen 128] [--concurrency 1,64]
//!                  [--long 8192,16384,32768]
//!         Serves random-token requests through `Engine` and prints TTFT, TPOT, P50/P95/P99
//!         latency, throughput (overall, and of the prefill and all-decoding phases as
//!         llama-batched-bench splits them) and the process's CPU time per wall second, as a
//!         markdown table and JSON ($KILN_BENCH_JSON): streamed at each concurrency, one request
//!         not streamed (`generate`), and one streamed request per long prompt length.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use kiln::loader::open_model;
use kiln::models::llama_kernels::KernelLlama;
use kiln::runner::batch::Batch;
use kiln::runner::Forward;
use kiln::{Device, Engine, Request, SamplingParams};
use kiln_kernels::cubecl::cuda::{CudaDevice, CudaRuntime};
use kiln_kernels::cubecl::prelude::{CubeElement, Float};
use kiln_kernels::cubecl::Runtime;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn check(args: &[String]) {
    match arg(args, "--dtype").as_deref() {
        None | Some("bf16") => check_as::<half::bf16>(args),
        Some("f32") => check_as::<f32>(args),
        Some(other) => panic!("--dtype {other}: bf16 or f32"),
    }
}

fn check_as<F: Float + CubeElement>(args: &[String]) {
    let model = PathBuf::from(arg(args, "--model").expect("--model"));
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(arg(args, "--cases").expect("--cases")).expect("cases file"),
    )
    .expect("JSON");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(arg(args, "--out").expect("--out")).expect("out file"),
    );
    let files = open_model(&model).expect("model");
    let block = 16;
    let t0 = Instant::now();
    let client = CudaRuntime::client(&CudaDevice::new(0));
    let mut m = KernelLlama::<CudaRuntime, F>::load(
        client,
        &files.weights,
        &files.config,
        4096,
        256,
        block,
    )
    .expect("load");
    eprintln!("loaded in {:.1?}", t0.elapsed());
    let cases: Vec<(Vec<u32>, Vec<u32>)> = cases["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| {
            let ids = |k: &str| -> Vec<u32> {
                case[k]
                    .as_array()
                    .expect(k)
                    .iter()
                    .map(|v| v.as_u64().expect("id") as u32)
                    .collect()
            };
            (ids("prompt_ids"), ids("reference_tokens"))
        })
        .collect();
    // Each case's own 64 blocks (the pool has 256), in reverse order.
    let tables: Vec<Vec<u32>> = (0..cases.len() as u32)
        .map(|c| (c * 64..(c + 1) * 64).rev().collect())
        .collect();
    let vocab = files.config.vocab_size;
    // Teacher-forced steps: step 0 the prompts' prefill, step i ≥ 1 their reference token i − 1.
    let step = |m: &mut KernelLlama<CudaRuntime, F>, which: &[usize], i: usize| {
        let mut batch = Batch::default();
        for &c in which {
            let (prompt, reference) = &cases[c];
            if i == 0 {
                batch.push_seq(prompt, prompt.len(), &tables[c], block, true);
            } else {
                let ctx = prompt.len() + i;
                batch.push_seq(&[reference[i - 1]], ctx, &tables[c], block, true);
            }
        }
        m.forward(&batch).expect("forward")
    };
    let steps = cases.iter().map(|(_, r)| r.len()).min().unwrap_or(0);
    let mut logits: Vec<Vec<f32>> = vec![Vec::new(); cases.len()];
    if args.iter().any(|a| a == "--together") {
        // Every case in each step's batch: prefill chunks side by side, then decode steps of
        // one row per case (the multi-row decode path).
        let all: Vec<usize> = (0..cases.len()).collect();
        let t = Instant::now();
        for i in 0..steps {
            let rows = step(&mut m, &all, i);
            for (c, row) in rows.chunks(vocab).enumerate() {
                logits[c].extend_from_slice(row);
            }
        }
        eprintln!(
            "{} cases together: {:.2?} per step",
            cases.len(),
            t.elapsed() / steps as u32
        );
    } else {
        for (c, case_logits) in logits.iter_mut().enumerate() {
            let t = Instant::now();
            for i in 0..steps {
                case_logits.extend(step(&mut m, &[c], i));
            }
            let (n, per) = (cases[c].0.len(), t.elapsed() / steps as u32);
            eprintln!("prompt {n}: {per:.2?} per step (prefill included)");
        }
    }
    for x in logits.iter().flatten() {
        out.write_all(&x.to_le_bytes()).expect("write");
    }
}

/// CPU seconds this process has used (user + system, from /proc; Linux ticks are 1/100 s).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(f64::NAN)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn bench(args: &[String]) {
    let model = PathBuf::from(arg(args, "--model").expect("--model"));
    let prompt_len: usize = arg(args, "--prompt-len").map_or(512, |v| v.parse().expect("number"));
    let gen: usize = arg(args, "--gen").map_or(128, |v| v.parse().expect("number"));
    let levels: Vec<usize> = arg(args, "--concurrency")
        .unwrap_or_else(|| "1".into())
        .split(',')
        .map(|v| v.parse().expect("number"))
        .collect();
    let long: Vec<usize> = arg(args, "--long")
        .map(|v| v.split(',').map(|x| x.parse().expect("number")).collect())
        .unwrap_or_default();
    let max_c = *levels.iter().max().expect("a level");
    let long_gen = 64;
    let max_long = long.iter().max().map_or(0, |l| l + long_gen);
    let t0 = Instant::now();
    let engine = Engine::builder()
        .model(&model)
        .device(Device::Cuda(0))
        .max_num_seqs(max_c)
        .kv_cache_tokens((max_c * (prompt_len + gen)).max(max_long).max(4096))
        .build()
        .expect("engine");
    eprintln!("engine built in {:.1?}", t0.elapsed());
    let vocab = engine.info().vocab_size as u32;
    // `c` greedy requests of `prompt_len` pseudo-random tokens (`salt` varies them), `n` out each.
    let request = |len: usize, r: u32, salt: u32, n: usize| {
        let ids: Vec<u32> = (0..len as u32)
            .map(|i| (i * 7919 + r * 104_729 + salt) % vocab)
            .collect();
        let p = SamplingParams {
            max_tokens: n,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        Request::from_tokens(ids).sampling(p)
    };
    let submit_len = |len: usize, c: usize, salt: u32, n: usize| -> Vec<kiln::TokenStream> {
        (0..c as u32)
            .map(|r| engine.stream(request(len, r, salt, n)).expect("request"))
            .collect()
    };
    let submit = |c: usize, salt: u32, n: usize| submit_len(prompt_len, c, salt, n);
    // Warm-up: compile every kernel variant a run meets (prefill and decode shapes) untimed.
    for c in [1, max_c] {
        for s in submit(c, 1, 40) {
            s.into_completion().expect("warm-up");
        }
    }
    eprintln!("warmed up");
    let mut json = Vec::new();
    println!("| run | prompt | gen | TTFT P50 ms | TPOT P50 ms | latency P50/P95/P99 s | output tok/s | prefill tok/s | decode tok/s | req/s | CPU s/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut runs: Vec<(String, usize, usize, usize)> = levels
        .iter()
        .map(|&c| (format!("{c} concurrent"), c, prompt_len, gen))
        .collect();
    runs.extend(
        long.iter()
            .map(|&l| ("long context".to_string(), 1, l, long_gen)),
    );
    for (name, c, len, n) in runs {
        let (start, cpu0) = (Instant::now(), cpu_seconds());
        let streams = submit_len(len, c, 0, n);
        let handles: Vec<_> = streams
            .into_iter()
            .map(|s| {
                std::thread::spawn(move || {
                    let mut times = Vec::new();
                    for chunk in s {
                        chunk.expect("chunk");
                        times.push(start.elapsed().as_secs_f64());
                    }
                    times
                })
            })
            .collect();
        let per_req: Vec<Vec<f64>> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let (wall, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
        let mut ttft: Vec<f64> = per_req.iter().map(|t| t[0]).collect();
        let mut tpot: Vec<f64> = per_req
            .iter()
            .map(|t| (t[t.len() - 1] - t[0]) / (t.len() - 1).max(1) as f64)
            .collect();
        let mut lat: Vec<f64> = per_req.iter().map(|t| t[t.len() - 1]).collect();
        let tokens: usize = per_req.iter().map(Vec::len).sum();
        let phases = Phases::of(&per_req, len);
        let row = serde_json::json!({
            "run": name, "concurrency": c, "prompt_len": len, "gen": n,
            "ttft_p50_ms": percentile(&mut ttft, 0.5) * 1e3,
            "tpot_p50_ms": percentile(&mut tpot, 0.5) * 1e3,
            "latency_p50_s": percentile(&mut lat, 0.5), "latency_p95_s": percentile(&mut lat, 0.95),
            "latency_p99_s": percentile(&mut lat, 0.99),
            "output_tok_per_s": tokens as f64 / wall, "req_per_s": c as f64 / wall,
            "cpu_s_per_s": cpu / wall,
            "prefill_tok_per_s": phases.prefill_tok_per_s,
            "decode_tok_per_s": phases.decode_tok_per_s,
        });
        print_row(&row);
        json.push(row);
    }
    // The same single request without streaming: `generate` returns the whole completion.
    let (start, cpu0) = (Instant::now(), cpu_seconds());
    let done = engine
        .generate(request(prompt_len, 0, 0, gen))
        .expect("generate");
    let (wall, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    let row = serde_json::json!({
        "run": "1, not streamed", "concurrency": 1, "prompt_len": prompt_len, "gen": gen,
        "latency_p50_s": wall, "latency_p95_s": wall, "latency_p99_s": wall,
        "output_tok_per_s": done.token_ids.len() as f64 / wall, "req_per_s": 1.0 / wall,
        "cpu_s_per_s": cpu / wall,
    });
    print_row(&row);
    json.push(row);
    if let Some(path) = std::env::var_os("KILN_BENCH_JSON") {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .expect("write JSON");
    }
}

/// A run's two phases as llama.cpp's `llama-batched-bench` reports them (S_PP, S_TG), from
/// every request's token times (seconds since submission): prefill = all prompt tokens over the
/// time to the last first token; decode = the tokens emitted while every request is decoding
/// (from the last first token to the first request's end) over that window's length.
struct Phases {
    prefill_tok_per_s: f64,
    decode_tok_per_s: f64,
}

impl Phases {
    fn of(per_req: &[Vec<f64>], prompt_len: usize) -> Self {
        let first = per_req.iter().map(|t| t[0]).fold(0.0, f64::max);
        let end = per_req
            .iter()
            .map(|t| t[t.len() - 1])
            .fold(f64::INFINITY, f64::min);
        // Tokens after `first` up to `end`: each one a decode step's output in that window.
        let emitted = per_req
            .iter()
            .flatten()
            .filter(|&&t| t > first && t <= end)
            .count();
        let decode_tok_per_s = if end > first {
            emitted as f64 / (end - first)
        } else {
            f64::NAN
        };
        Self {
            prefill_tok_per_s: (per_req.len() * prompt_len) as f64 / first,
            decode_tok_per_s,
        }
    }
}

fn print_row(row: &serde_json::Value) {
    let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "| {} | {} | {} | {:.1} | {:.2} | {:.2}/{:.2}/{:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
        row["run"].as_str().unwrap_or(""),
        row["prompt_len"],
        row["gen"],
        f("ttft_p50_ms"),
        f("tpot_p50_ms"),
        f("latency_p50_s"),
        f("latency_p95_s"),
        f("latency_p99_s"),
        f("output_tok_per_s"),
        f("prefill_tok_per_s"),
        f("decode_tok_per_s"),
        f("req_per_s"),
        f("cpu_s_per_s"),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("check") => check(&args),
        Some("bench") => bench(&args),
        _ => eprintln!("usage: engine check|bench --model DIR ... (see the file's header)"),
    }
}
