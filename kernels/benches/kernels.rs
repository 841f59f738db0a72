//! Kernel micro-benchmarks on CUDA (run on the GPU machine): each kernel is first checked in bf16
//! against its reference on fresh random data with a poisoned output, then timed; the table gives
//! achieved bandwidth against the device's copy bandwidth ($KILN_COPY_GBPS, read + write; the
//! floor's rate for these memory-bound kernels). JSON goes to $KILN_BENCH_JSON when set.
//!
//!     cargo bench -p kiln-kernels --features cuda --bench kernels   (on the GPU machine: the built binary)

use std::time::Instant;

use half::bf16;
use kiln_kernels::cubecl::cuda::{CudaDevice, CudaRuntime};
use kiln_kernels::cubecl::future::block_on;
use kiln_kernels::cubecl::prelude::*;
use kiln_kernels::cubecl::server::Handle;
use kiln_kernels::decode_attention_tiles::Tiles;
use kiln_kernels::{
    argmax, embedding, gemv, matmul, mma_gemm, paged_decode_attention as pda,
    prefill_attention as pfa, rms_norm, rope_kv_write, sample, silu_mul,
};
use rand::{Rng, SeedableRng};

type R = CudaRuntime;

struct Bench {
    client: ComputeClient<R>,
    rng: rand::rngs::StdRng,
    rows: Vec<serde_json::Value>,
    copy_gbps: f64,
    /// Small shapes, one timed launch: for runs under compute-sanitizer ($KILN_SANITIZE).
    quick: bool,
    /// Launches per timed run instead of each bench's own count ($KILN_BENCH_ITERS): few, for
    /// runs under Nsight Compute, whose kernel durations are the device's time.
    iters: Option<usize>,
}

impl Bench {
    fn random(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| bf16::from_f32(self.rng.random_range(-1.0..1.0)).to_f32())
            .collect()
    }
    fn upload(&self, v: &[f32]) -> Handle {
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        self.client.create_from_slice(bf16::as_bytes(&b))
    }
    fn poisoned(&self, n: usize) -> Handle {
        self.upload(&vec![f32::NAN; n])
    }
    fn read(&self, h: Handle) -> Vec<f32> {
        let bytes = self.client.read_one_unchecked(h);
        bf16::from_bytes(&bytes)
            .iter()
            .map(|x| x.to_f32())
            .collect()
    }
    fn sync(&self) {
        block_on(self.client.sync()).expect("device sync");
    }
    /// Seconds per launch of `f`: `iters` launches back to back between two syncs (as the engine
    /// issues them), median of 5 such runs, after a warm-up.
    fn time(&self, iters: usize, mut f: impl FnMut(usize)) -> f64 {
        let iters = if self.quick {
            1
        } else {
            self.iters.unwrap_or(iters)
        };
        for i in 0..3 {
            f(i);
        }
        self.sync();
        let mut t: Vec<f64> = (0..5)
            .map(|_| {
                let s = Instant::now();
                for i in 0..iters {
                    f(i);
                }
                self.sync();
                s.elapsed().as_secs_f64() / iters as f64
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }
    fn check(&self, name: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
        let e = rel_err(got, want);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{name}: unwritten or non-finite output"
        );
        assert!(e < tol, "{name}: relative error {e} over {tol}");
        e
    }
    fn record(&mut self, kernel: &str, shape: String, secs: f64, bytes: f64, err: f64) {
        let gbps = bytes / secs / 1e9;
        println!(
            "| {kernel:<22} | {shape:<34} | {:>9.1} | {:>8.0} | {:>5.1} % | {err:.1e} |",
            secs * 1e6,
            gbps,
            100.0 * gbps / self.copy_gbps
        );
        self.rows.push(
            serde_json::json!({"kernel": kernel, "shape": shape, "us": secs * 1e6,
            "gb_per_s": gbps, "pct_of_copy": 100.0 * gbps / self.copy_gbps, "rel_err": err}),
        );
    }
}

fn bench_silu_mul(b: &mut Bench) {
    let shapes: &[(usize, usize)] = if b.quick {
        &[(3, 1000)]
    } else {
        &[(1, 14336), (64, 14336), (2048, 14336)]
    };
    for &(rows, cols) in shapes {
        let x = b.random(rows * 2 * cols);
        let xh = b.upload(&x);
        let out = b.poisoned(rows * cols);
        silu_mul::launch::<R, bf16>(&b.client, &xh, &out, rows, cols);
        let err = b.check(
            "silu_mul",
            &b.read(out.clone()),
            &silu_mul::reference(&x, cols),
            2e-2,
        );
        let secs = b.time(50, |_| {
            silu_mul::launch::<R, bf16>(&b.client, &xh, &out, rows, cols)
        });
        b.record(
            "silu_mul",
            format!("rows={rows} cols={cols}"),
            secs,
            (rows * cols * 3 * 2) as f64,
            err,
        );
    }
}

fn bench_gemv(b: &mut Bench) {
    let shapes: &[(usize, usize)] = if b.quick {
        &[(300, 520)]
    } else {
        &[(14336, 4096), (4096, 14336), (6144, 4096), (128256, 4096)]
    };
    for &(n, k) in shapes {
        for &m in &[1usize, 4, 8] {
            let x = b.random(m * k);
            // Several weight copies so repeated runs stream from memory, not L2.
            let copies = (400_000_000 / (n * k * 2)).clamp(1, 4);
            let ws: Vec<Vec<f32>> = (0..copies).map(|_| b.random(n * k)).collect();
            let wh: Vec<Handle> = ws.iter().map(|w| b.upload(w)).collect();
            let xh = b.upload(&x);
            let y = b.poisoned(m * n);
            gemv::launch::<R, bf16>(&b.client, &xh, &wh[0], None, &y, m, n, k);
            let got = b.read(y.clone());
            let want = gemv::reference(&x, &ws[0], None, m, n, k);
            let err = b.check("gemv", &got, &want, 1e-2);
            let secs = b.time(20, |i| {
                gemv::launch::<R, bf16>(&b.client, &xh, &wh[i % copies], None, &y, m, n, k)
            });
            let bytes = ((n * k + m * k + m * n) * 2) as f64;
            b.record("gemv", format!("m={m} n={n} k={k}"), secs, bytes, err);
        }
    }
}

/// The gate-up GEMV with the SwiGLU epilogue, against GEMV + SiLU·mul's reference.
fn bench_gemv_swiglu(b: &mut Bench) {
    let (n, k) = if b.quick { (300, 520) } else { (14336, 4096) };
    for &m in &[1usize, 4] {
        let copies = (400_000_000 / (2 * n * k * 2)).clamp(1, 4);
        let x = b.random(m * k);
        let ws: Vec<Vec<f32>> = (0..copies).map(|_| b.random(2 * n * k)).collect();
        let wh: Vec<Handle> = ws.iter().map(|w| b.upload(w)).collect();
        let xh = b.upload(&x);
        let y = b.poisoned(m * n);
        let opts = gemv::Options {
            swiglu: true,
            ..Default::default()
        };
        let tuning = gemv::DEFAULT_TUNING;
        gemv::launch_with::<R, bf16>(&b.client, &xh, &wh[0], &y, m, n, k, opts, tuning);
        let want = silu_mul::reference(&gemv::reference(&x, &ws[0], None, m, 2 * n, k), n);
        let err = b.check("gemv swiglu", &b.read(y.clone()), &want, 1e-2);
        let secs = b.time(20, |i| {
            gemv::launch_with::<R, bf16>(&b.client, &xh, &wh[i % copies], &y, m, n, k, opts, tuning)
        });
        let bytes = ((2 * n * k + m * k + m * n) * 2) as f64;
        b.record(
            "gemv swiglu",
            format!("m={m} n={n} k={k}"),
            secs,
            bytes,
            err,
        );
    }
}

/// The GEMV's row spread (planes per cube × rows per plane × loads in flight per lane) on the
/// decode projections of Llama-3.1-8B (QKV, O, down, gate-up as SwiGLU).
fn sweep_gemv(b: &mut Bench) {
    for &(n, k, swiglu) in &[
        (6144usize, 4096usize, false),
        (4096, 4096, false),
        (4096, 14336, false),
        (14336, 4096, true),
    ] {
        let m = 1;
        let w_rows = if swiglu { 2 * n } else { n };
        let copies = (400_000_000 / (w_rows * k * 2)).clamp(1, 4);
        let x = b.random(m * k);
        let ws: Vec<Vec<f32>> = (0..copies).map(|_| b.random(w_rows * k)).collect();
        let wh: Vec<Handle> = ws.iter().map(|w| b.upload(w)).collect();
        let xh = b.upload(&x);
        let mut want = gemv::reference(&x, &ws[0], None, m, w_rows, k);
        if swiglu {
            want = silu_mul::reference(&want, n);
        }
        for &(planes, rows_per_plane, depth) in &[
            (4u32, 1usize, 4usize),
            (4, 1, 8),
            (8, 1, 4),
            (4, 2, 2),
            (4, 2, 4),
            (2, 2, 4),
            (4, 4, 2),
            (8, 2, 4),
            (8, 4, 4),
            (8, 4, 2),
            (16, 1, 4),
            (16, 2, 4),
            (16, 1, 2),
        ] {
            let tuning = gemv::Tuning {
                planes,
                rows_per_plane,
                depth,
            };
            let launch = |i: usize, y: &Handle| {
                let opts = gemv::Options {
                    swiglu,
                    ..Default::default()
                };
                gemv::launch_with::<R, bf16>(
                    &b.client,
                    &xh,
                    &wh[i % copies],
                    y,
                    m,
                    n,
                    k,
                    opts,
                    tuning,
                )
            };
            let y = b.poisoned(m * n);
            launch(0, &y);
            let err = b.check("gemv sweep", &b.read(y.clone()), &want, 1e-2);
            let secs = b.time(30, |i| launch(i, &y));
            b.record(
                if swiglu {
                    "gemv swiglu (p×r×d)"
                } else {
                    "gemv (p×r×d)"
                },
                format!("{planes}×{rows_per_plane}×{depth} m=1 n={n} k={k}"),
                secs,
                ((w_rows * k + k + n) * 2) as f64,
                err,
            );
        }
    }
}

fn bench_decode_attention(b: &mut Bench) {
    let shapes: &[(usize, usize)] = if b.quick {
        &[(1, 700), (3, 90)]
    } else {
        &[(1, 8192), (1, 32768), (16, 2048), (64, 1000)]
    };
    for &(tokens, ctx) in shapes {
        decode_attention_case(b, tokens, ctx, &[Attn::Default]);
    }
}

/// How a decode-attention case runs: the device's choice, the one-key-per-unit kernel (keys per
/// split, units per cube, units per key), or the tile kernel (spread, keys per split).
#[derive(Clone, Copy)]
enum Attn {
    Default,
    Lanes(usize, usize, usize),
    Tiles(Tiles, usize),
}

/// Both split kernels side by side from one sequence to 64: the one-key-per-unit kernel at its
/// rule's split, the tile kernel at its rule's split for several spreads, and at fixed splits.
fn sweep_decode_tiles(b: &mut Bench) {
    let sms = b
        .client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(1) as usize;
    let spreads =
        [(4, 2), (4, 3), (2, 3), (2, 4), (8, 2)].map(|(planes, stages)| Tiles { planes, stages });
    let cases = [
        (1, 516),
        (1, 2048),
        (1, 8192),
        (1, 32768),
        (4, 2048),
        (16, 576),
        (16, 2048),
        (64, 576),
        (64, 2048),
    ];
    for (tokens, ctx) in cases {
        let lanes_split = pda::split_keys(tokens, 8, ctx);
        let threads = pda::split_threads(lanes_split);
        let mut configs = vec![Attn::Lanes(
            lanes_split,
            threads,
            (threads / lanes_split).max(1),
        )];
        for spread in spreads {
            configs.push(Attn::Tiles(
                spread,
                pda::tile_split_keys(tokens, 8, ctx, sms, spread),
            ));
        }
        for split in [256, 512, 1024] {
            configs.push(Attn::Tiles(spreads[0], split));
        }
        decode_attention_case(b, tokens, ctx, &configs);
    }
}

/// Decode attention with RoPE and the KV write folded in (decode-only steps): each query's
/// Q/K/V come as one fused projection row before RoPE; checked (output and caches) against the
/// references, timed.
fn bench_decode_attention_fresh(b: &mut Bench) {
    let cases: &[(usize, usize)] = if b.quick {
        &[(1, 700), (3, 90)]
    } else {
        &[(1, 516), (16, 2048)]
    };
    let (kv_heads, group, hd, block_size) = (8usize, 4usize, 128usize, 16usize);
    let heads = kv_heads * group;
    let (q_width, kv_width) = (heads * hd, kv_heads * hd);
    let width = q_width + 2 * kv_width;
    for &(tokens, ctx) in cases {
        let max_blocks = ctx.div_ceil(block_size);
        let num_blocks = tokens * max_blocks;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            let j = b.rng.random_range(0..=i);
            ids.swap(i, j);
        }
        let ctxs: Vec<u32> = (0..tokens).map(|t| (ctx - t % 7) as u32).collect();
        let positions: Vec<u32> = ctxs.iter().map(|&c| c - 1).collect();
        let slots: Vec<u32> = (0..tokens)
            .map(|t| {
                let p = positions[t] as usize;
                (ids[t * max_blocks + p / block_size] as usize * block_size + p % block_size) as u32
            })
            .collect();
        let (cos, sin) = rope_kv_write::plain_tables(ctx, hd);
        let projected = b.random(tokens * width);
        let mut k_cache = b.random(num_blocks * block_size * kv_width);
        let mut v_cache = b.random(num_blocks * block_size * kv_width);
        let (kh, vh) = (b.upload(&k_cache), b.upload(&v_cache));
        let all = b.upload(&projected);
        let f32s = |v: &[f32]| b.client.create_from_slice(f32::as_bytes(v));
        let u32s = |v: &[u32]| b.client.create_from_slice(u32::as_bytes(v));
        let (cos_h, sin_h) = (f32s(&cos), f32s(&sin));
        let (bt, cl) = (u32s(&ids), u32s(&ctxs));
        let rows = u32s(&(0..tokens as u32).collect::<Vec<_>>());
        let queries = pda::Queries {
            count: tokens,
            rows: &rows,
            block_tables: &bt,
            context_lens: &cl,
        };
        let shape = pda::Shape {
            kv_heads,
            group,
            head_dim: hd,
            block_size,
            max_blocks,
        };
        let projections =
            rope_kv_write::Projections::fused(&all, q_width, kv_width, size_of::<bf16>());
        let query = pda::Query::Fresh(pda::Fresh {
            projections: &projections,
            cos: &cos_h,
            sin: &sin_h,
        });
        let ws = pda::Workspace::new::<R, bf16>(&b.client, tokens, kv_heads, heads, hd, ctx);
        let scale = 1.0 / (hd as f32).sqrt();
        let out = b.poisoned(tokens * q_width);
        let run = |b: &Bench| {
            pda::launch::<R, bf16>(&b.client, shape, queries, query, &kh, &vh, &out, &ws, scale)
        };
        run(b);
        let part = |t: usize, at: usize, w: usize| projected[t * width + at..][..w].to_vec();
        let mut q: Vec<f32> = (0..tokens).flat_map(|t| part(t, 0, q_width)).collect();
        let mut k: Vec<f32> = (0..tokens)
            .flat_map(|t| part(t, q_width, kv_width))
            .collect();
        let v: Vec<f32> = (0..tokens)
            .flat_map(|t| part(t, q_width + kv_width, kv_width))
            .collect();
        rope_kv_write::rope_reference(&mut q, &positions, &cos, &sin, heads, hd);
        rope_kv_write::rope_reference(&mut k, &positions, &cos, &sin, kv_heads, hd);
        rope_kv_write::write_reference(&k, &mut k_cache, &slots, kv_width);
        rope_kv_write::write_reference(&v, &mut v_cache, &slots, kv_width);
        let want = pda::reference(shape, &q, &k_cache, &v_cache, &ids, &ctxs, scale);
        let err = b.check("decode attention fresh", &b.read(out.clone()), &want, 2e-2);
        b.check(
            "decode attention fresh: K cache",
            &b.read(kh.clone()),
            &k_cache,
            1e-2,
        );
        b.check(
            "decode attention fresh: V cache",
            &b.read(vh.clone()),
            &v_cache,
            1e-2,
        );
        let secs = b.time(20, |_| run(b));
        let keys: usize = ctxs.iter().map(|&c| c as usize).sum();
        b.record(
            "decode attn + RoPE/KV",
            format!("tok={tokens} ctx={ctx}"),
            secs,
            (keys * kv_width * 2 * 2) as f64,
            err,
        );
    }
}

/// Decode attention's keys per split and units per cube, one token at short to long context
/// (the default picks the shortest split that yields enough cubes).
fn sweep_decode_attention(b: &mut Bench) {
    let short = [
        (64, 256, 4),
        (1024, 1024, 4),
        (1024, 1024, 2),
        (512, 1024, 4),
        (512, 1024, 2),
        (640, 1024, 4),
    ];
    let long = [
        (256, 256, 1),
        (512, 512, 1),
        (1024, 512, 1),
        (1024, 1024, 2),
    ];
    for ctx in [516, 2048, 8192, 32768] {
        let configs = if ctx <= 2048 { &short[..] } else { &long[..] };
        let configs: Vec<_> = configs
            .iter()
            .map(|&(keys, threads, lanes)| Attn::Lanes(keys, threads, lanes))
            .collect();
        decode_attention_case(b, 1, ctx, &configs);
    }
}

/// `tokens` decode queries of about `ctx` keys each (Llama-3.1-8B heads), each over a shuffled
/// set of blocks: checked, then timed once per configuration.
fn decode_attention_case(b: &mut Bench, tokens: usize, ctx: usize, configs: &[Attn]) {
    let (kv_heads, group, head_dim, block_size) = (8usize, 4usize, 128usize, 16usize);
    let heads = kv_heads * group;
    let max_blocks = ctx.div_ceil(block_size);
    let num_blocks = tokens * max_blocks;
    let slots = num_blocks * block_size;
    let q = b.random(tokens * heads * head_dim);
    let k = b.random(slots * kv_heads * head_dim);
    let v = b.random(slots * kv_heads * head_dim);
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = b.rng.random_range(0..=i);
        ids.swap(i, j);
    }
    let ctxs: Vec<u32> = (0..tokens).map(|t| (ctx - t % 7) as u32).collect();
    let shape = pda::Shape {
        kv_heads,
        group,
        head_dim,
        block_size,
        max_blocks,
    };
    let (qh, kh, vh) = (b.upload(&q), b.upload(&k), b.upload(&v));
    let bt = b.client.create_from_slice(u32::as_bytes(&ids));
    let cl = b.client.create_from_slice(u32::as_bytes(&ctxs));
    let rows: Vec<u32> = (0..tokens as u32).collect();
    let rows = b.client.create_from_slice(u32::as_bytes(&rows));
    let queries = pda::Queries {
        count: tokens,
        rows: &rows,
        block_tables: &bt,
        context_lens: &cl,
    };
    let scale = 1.0 / (head_dim as f32).sqrt();
    let want = (tokens * ctx <= 64 * 1024 || tokens == 1)
        .then(|| pda::reference(shape, &q, &k, &v, &ids, &ctxs, scale));
    for &config in configs {
        let with_split =
            |keys| pda::Workspace::with_split_keys(&b.client, tokens, heads, head_dim, ctx, keys);
        let ws = match config {
            Attn::Lanes(keys, threads, lanes) => pda::Workspace {
                threads,
                lanes,
                ..with_split(keys)
            },
            Attn::Tiles(spread, keys) => pda::Workspace {
                tiles: Some(spread),
                ..with_split(keys)
            },
            Attn::Default => {
                pda::Workspace::new::<R, bf16>(&b.client, tokens, kv_heads, heads, head_dim, ctx)
            }
        };
        let out = b.poisoned(q.len());
        let run = |b: &Bench| {
            let query = pda::Query::Rotated(&qh);
            pda::launch::<R, bf16>(&b.client, shape, queries, query, &kh, &vh, &out, &ws, scale)
        };
        run(b);
        let got = b.read(out.clone());
        let err = match &want {
            Some(want) => b.check("paged_decode_attention", &got, want, 2e-2),
            None => {
                assert!(
                    got.iter().all(|x| x.is_finite()),
                    "attention: unwritten output"
                );
                f64::NAN
            }
        };
        let secs = b.time(if tokens * ctx < 100_000 { 50 } else { 20 }, |_| run(b));
        let keys: usize = ctxs.iter().map(|&c| c as usize).sum();
        let bytes = (keys * kv_heads * head_dim * 2 * 2) as f64;
        let (name, desc) = match config {
            Attn::Lanes(keys, threads, lanes) => (
                "decode attn (lanes)",
                format!("split={keys} units={threads}x{lanes} tok={tokens} ctx={ctx}"),
            ),
            Attn::Tiles(t, keys) => (
                "decode attn (tiles)",
                format!(
                    "split={keys} {}x{} tok={tokens} ctx={ctx}",
                    t.planes, t.stages
                ),
            ),
            Attn::Default => (
                "paged_decode_attention",
                format!("tok={tokens} ctx={ctx} kvh=8 g=4 d=128"),
            ),
        };
        b.record(name, desc, secs, bytes, err);
    }
}

/// Causal prefill attention over the paged cache (tensor cores where the device has them):
/// checked against the reference on ragged chunks, timed on whole prompts as TFLOP/s
/// (2·s²·d·heads for a causal prompt of s tokens, as torch's SDPA is counted).
fn bench_prefill_attention(b: &mut Bench) {
    let tiling = pfa::Tiling::for_device::<R, bf16>(&b.client, PREFILL_ATTENTION);
    println!("prefill attention tiling: {tiling:?}");
    prefill_attention_cases(b, tiling, "prefill_attention");
}

/// Llama-3.1-8B's attention shape, on 16-key cache blocks.
const PREFILL_ATTENTION: pfa::Shape = pfa::Shape {
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
    block_size: 16,
};

/// Prefill attention's tilings (planes a cube × 16-row tiles a plane × keys a block) on the
/// bench's cases: a plane of two row tiles feeds each K/V fragment it loads to both (half the
/// shared reads per product) but holds twice the output and score registers.
fn sweep_prefill_attention(b: &mut Bench) {
    let mma = pfa::Tiling::for_device::<R, bf16>(&b.client, PREFILL_ATTENTION).mma;
    for (planes, row_tiles, block_keys) in [(4, 2, 32), (4, 2, 64), (4, 1, 64), (2, 2, 32)] {
        let tiling = pfa::Tiling {
            planes,
            row_tiles,
            block_keys,
            mma,
        };
        prefill_attention_cases(
            b,
            tiling,
            &format!("prefill_attention {planes}x{row_tiles}x{block_keys}"),
        );
    }
}

/// [`bench_prefill_attention`]'s cases on one tiling, reported as `kernel`.
fn prefill_attention_cases(b: &mut Bench, tiling: pfa::Tiling, kernel: &str) {
    let shape = PREFILL_ATTENTION;
    let (hd, kvh) = (shape.head_dim, shape.kv_heads);
    // (cached keys, new rows) per sequence.
    let cases: &[&[(usize, usize)]] = if b.quick {
        &[&[(0, 70), (37, 20)]]
    } else {
        &[
            &[(0, 100), (0, 260), (300, 77)],
            &[(0, 4096)],
            &[(0, 1024); 4],
            &[(0, 8192)],
        ]
    };
    for seqs in cases {
        let max_blocks = seqs
            .iter()
            .map(|&(c, n)| (c + n).div_ceil(shape.block_size))
            .max()
            .unwrap_or(1);
        let num_blocks = max_blocks * seqs.len();
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            let j = b.rng.random_range(0..=i);
            ids.swap(i, j);
        }
        let mut chunks = Vec::new();
        let mut tokens = 0;
        for (s, &(cached, len)) in seqs.iter().enumerate() {
            chunks.push(pfa::Chunk {
                table_row: s,
                first_token: tokens,
                len,
                first_pos: cached,
            });
            tokens += len;
        }
        let slots = num_blocks * shape.block_size;
        let q = b.random(tokens * shape.heads * hd);
        let k = b.random(slots * kvh * hd);
        let v = b.random(slots * kvh * hd);
        let (qh, kh, vh) = (b.upload(&q), b.upload(&k), b.upload(&v));
        let plan = pfa::tiles(&chunks, tiling.tile_rows());
        let th = b.client.create_from_slice(u32::as_bytes(&plan));
        let bt = b.client.create_from_slice(u32::as_bytes(&ids));
        let n_tiles = plan.len() / 4;
        // The model's scale, and on the checked case also a sharp softmax (scores ≈ 45 × as
        // spread), whose row maxima keep growing past the first key block: the tensor-core
        // path's rescale runs mid-walk there, not only on the first block.
        let checked = tokens <= 512;
        let model_scale = 1.0 / (hd as f32).sqrt();
        let scales: &[f32] = if checked {
            &[model_scale, 4.0]
        } else {
            &[model_scale]
        };
        // Score/value products actually needed: each row sees its position + 1 keys.
        let pairs: usize = seqs
            .iter()
            .map(|&(c, n)| (0..n).map(|r| c + r + 1).sum::<usize>())
            .sum();
        let flops = 4.0 * (pairs * hd * shape.heads) as f64;
        for &scale in scales {
            let out = b.poisoned(q.len());
            let run = |b: &Bench| {
                pfa::launch::<R, bf16>(
                    &b.client, shape, tiling, &th, n_tiles, &qh, &kh, &vh, &bt, max_blocks, &out,
                    scale,
                )
            };
            run(b);
            let got = b.read(out.clone());
            let err = if checked {
                let want = pfa::reference(shape, &chunks, &q, &k, &v, &ids, max_blocks, scale);
                b.check(kernel, &got, &want, 2e-2)
            } else {
                assert!(
                    got.iter().all(|x| x.is_finite()),
                    "prefill attention: unwritten output"
                );
                f64::NAN
            };
            let secs = b.time(10, |_| run(b));
            let tflops = flops / secs / 1e12;
            let sharp = if scale == model_scale {
                String::new()
            } else {
                format!(" scale={scale}")
            };
            let desc = format!("{seqs:?} h=32 kvh=8 d=128{sharp}");
            println!(
                "| {kernel:<22} | {desc} | {:>9.1} | {tflops:>6.0} TFLOP/s | {err:.1e} |",
                secs * 1e6
            );
            b.rows
                .push(serde_json::json!({"kernel": kernel, "shape": desc,
                "us": secs * 1e6, "tflops": tflops, "rel_err": err,
                "tiling": format!("{tiling:?}")}));
        }
    }
}

fn bench_rms_norm(b: &mut Bench) {
    let shapes: &[(usize, usize)] = if b.quick {
        &[(3, 4096)]
    } else {
        &[(1, 4096), (64, 4096), (4096, 4096)]
    };
    for &(rows, cols) in shapes {
        let x = b.random(rows * cols);
        let r = b.random(rows * cols);
        let w = b.random(cols);
        let (xh, rh, wh) = (b.upload(&x), b.upload(&r), b.upload(&w));
        let out = b.poisoned(rows * cols);
        rms_norm::launch::<R, bf16>(&b.client, &xh, Some(&rh), &wh, &out, rows, cols, 1e-5);
        let mut r_ref = r.clone();
        let want = rms_norm::reference(&x, Some(&mut r_ref), &w, cols, 1e-5);
        let err = b.check("rms_norm", &b.read(out.clone()), &want, 2e-2);
        let secs = b.time(50, |_| {
            rms_norm::launch::<R, bf16>(&b.client, &xh, Some(&rh), &wh, &out, rows, cols, 1e-5)
        });
        // Reads input and residual, writes residual and output.
        b.record(
            "rms_norm+residual",
            format!("rows={rows} cols={cols}"),
            secs,
            (rows * cols * 2 * 4) as f64,
            err,
        );
    }
}

/// Sampling on the device (temperature 0.8, top-k 50, top-p 0.95, min-p 0.02, a fresh draw
/// per row) over Llama-3's vocabulary: checked against the reference draw, timed.
fn bench_sample(b: &mut Bench) {
    let vocab = if b.quick { 5000 } else { 128256 };
    for rows in [1usize, 64] {
        // Spread like logits (a power-of-two scale keeps the bf16 values exact).
        let logits: Vec<f32> = b.random(rows * vocab).iter().map(|x| x * 8.0).collect();
        let settings: Vec<sample::Settings> = (0..rows)
            .map(|_| sample::Settings {
                inv_temperature: 1.0 / 0.8,
                top_k: 50,
                top_p: 0.95,
                min_p: 0.02,
                uniform: b.rng.random_range(0.0..1.0),
            })
            .collect();
        let lh = b.upload(&logits);
        let out = b
            .client
            .create_from_slice(u32::as_bytes(&vec![u32::MAX; rows]));
        let run = |b: &Bench| sample::launch::<R, bf16>(&b.client, &lh, &settings, &out, vocab);
        run(b);
        let got = u32::from_bytes(&b.client.read_one_unchecked(out.clone())).to_vec();
        assert_eq!(
            got,
            sample::reference(&logits, &settings),
            "sample: rows {rows}"
        );
        let secs = b.time(20, |_| run(b));
        b.record(
            "sample",
            format!("rows={rows} vocab={vocab}"),
            secs,
            (rows * vocab * 2) as f64,
            0.0,
        );
    }
}

/// RoPE + KV write, embedding gather and argmax at decode-step sizes (Llama-3.1-8B shapes).
fn bench_step_kernels(b: &mut Bench) {
    let (tokens, heads, kvh, hd) = (if b.quick { 5 } else { 64 }, 32usize, 8usize, 128usize);
    // RoPE
    let half = hd / 2;
    let max_pos = 4096;
    let cos: Vec<f32> = (0..max_pos * half)
        .map(|j| ((j / half) as f32 * 0.01 * (j % half) as f32).cos())
        .collect();
    let sin: Vec<f32> = (0..max_pos * half)
        .map(|j| ((j / half) as f32 * 0.01 * (j % half) as f32).sin())
        .collect();
    let positions: Vec<u32> = (0..tokens as u32)
        .map(|t| t * 61 % max_pos as u32)
        .collect();
    let slots_total = 4096;
    let width = kvh * hd;
    let slots: Vec<u32> = (0..tokens as u32)
        .map(|t| (t * 37 + 5) % slots_total as u32)
        .collect();
    let (mut q, mut k, v) = (
        b.random(tokens * heads * hd),
        b.random(tokens * width),
        b.random(tokens * width),
    );
    let (mut kc, mut vc) = (b.random(slots_total * width), b.random(slots_total * width));
    let (qh, kh, vh) = (b.upload(&q), b.upload(&k), b.upload(&v));
    let projections = rope_kv_write::Projections::separate(qh, kh, vh, heads * hd, width);
    let (kch, vch) = (b.upload(&kc), b.upload(&vc));
    let u32s = |v: &[u32]| b.client.create_from_slice(u32::as_bytes(v));
    let (ph, slh) = (u32s(&positions), u32s(&slots));
    let (ch, sh) = (
        b.client.create_from_slice(f32::as_bytes(&cos)),
        b.client.create_from_slice(f32::as_bytes(&sin)),
    );
    let q_out = b.poisoned(q.len());
    let launch = || {
        let step = rope_kv_write::Step {
            projections: &projections,
            positions: &ph,
            slots: &slh,
            tokens,
            q_out: &q_out,
        };
        rope_kv_write::launch::<R, bf16>(&b.client, step, &kch, &vch, &ch, &sh, heads, kvh, hd)
    };
    launch();
    rope_kv_write::rope_reference(&mut q, &positions, &cos, &sin, heads, hd);
    rope_kv_write::rope_reference(&mut k, &positions, &cos, &sin, kvh, hd);
    rope_kv_write::write_reference(&k, &mut kc, &slots, width);
    rope_kv_write::write_reference(&v, &mut vc, &slots, width);
    let err = b
        .check("rope q", &b.read(q_out.clone()), &q, 1e-2)
        .max(b.check("rope k cache", &b.read(kch.clone()), &kc, 1e-2))
        .max(b.check("v cache", &b.read(vch.clone()), &vc, 1e-6));
    let secs = b.time(50, |_| launch());
    b.record(
        "rope_kv_write",
        format!("tok={tokens} h=32 kvh=8 d=128"),
        secs,
        ((tokens * (heads + 2 * kvh) * hd) * 2 * 2) as f64,
        err,
    );
    // Embedding gather
    let (vocab, hidden) = (if b.quick { 1000 } else { 128256 }, 4096usize);
    let table = b.random(vocab * hidden);
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|t| t * 7919 % vocab as u32)
        .collect();
    let (th, ih) = (
        b.upload(&table),
        b.client.create_from_slice(u32::as_bytes(&ids)),
    );
    let out = b.poisoned(tokens * hidden);
    embedding::launch::<R, bf16>(&b.client, &th, &ih, &out, tokens, hidden);
    let err = b.check(
        "embedding",
        &b.read(out.clone()),
        &embedding::reference(&table, &ids, hidden),
        1e-6,
    );
    let secs = b.time(50, |_| {
        embedding::launch::<R, bf16>(&b.client, &th, &ih, &out, tokens, hidden)
    });
    b.record(
        "embedding",
        format!("tok={tokens} hidden={hidden}"),
        secs,
        (tokens * hidden * 2 * 2) as f64,
        err,
    );
    // Argmax over logits rows
    let logits = b.random(tokens * vocab);
    let lh = b.upload(&logits);
    let out = b
        .client
        .create_from_slice(u32::as_bytes(&vec![u32::MAX; tokens]));
    argmax::launch::<R, bf16>(&b.client, &lh, &out, tokens, vocab);
    let got = u32::from_bytes(&b.client.read_one_unchecked(out.clone())).to_vec();
    assert_eq!(got, argmax::reference(&logits, vocab), "argmax");
    let secs = b.time(50, |_| {
        argmax::launch::<R, bf16>(&b.client, &lh, &out, tokens, vocab)
    });
    b.record(
        "argmax",
        format!("rows={tokens} vocab={vocab}"),
        secs,
        (tokens * vocab * 2) as f64,
        0.0,
    );
}

/// Prefill GEMMs (cubek's matmul): achieved TFLOP/s; the ratio to torch's cuBLAS on the same
/// shapes is printed by scripts/gpu-kernels.sh.
fn bench_matmul(b: &mut Bench) {
    let shapes: &[(usize, usize, usize)] = if b.quick {
        &[(40, 96, 128)]
    } else {
        &[
            (512, 14336, 4096),
            (4096, 14336, 4096),
            (2048, 4096, 14336),
            (2048, 28672, 4096),
            (2048, 4096, 4096),
            (2048, 1024, 4096),
        ]
    };
    for &(m, n, k) in shapes {
        let x = b.random(m * k);
        let w = b.random(n * k);
        let (xh, wh) = (b.upload(&x), b.upload(&w));
        let y = b.poisoned(m * n);
        matmul::launch::<R, bf16>(&b.client, &xh, &wh, &y, m, n, k).expect("matmul");
        let got = b.read(y.clone());
        // Check a sample of rows against the f64 reference (the full product is slow on the host).
        let rows = 4.min(m);
        let want = gemv::reference(&x[..rows * k], &w, None, rows, n, k);
        let err = b.check("matmul", &got[..rows * n], &want, 1e-2);
        let secs = b.time(10, |_| {
            matmul::launch::<R, bf16>(&b.client, &xh, &wh, &y, m, n, k).expect("matmul")
        });
        let tflops = 2.0 * (m * n * k) as f64 / secs / 1e12;
        println!(
            "| matmul (cubek)         | m={m} n={n} k={k} | {:>9.1} | {tflops:>6.0} TFLOP/s |",
            secs * 1e6
        );
        b.rows.push(
            serde_json::json!({"kernel": "matmul", "shape": format!("m={m} n={n} k={k}"),
            "us": secs * 1e6, "tflops": tflops, "rel_err": err}),
        );
    }
}

/// cubek's tensor-core strategies side by side on decode-batch (m ≤ 64: weight-read bound, % of
/// copy bandwidth for the weight) and prefill-chunk (m = 2048: TFLOP/s) projection shapes.
fn sweep_matmul(b: &mut Bench) {
    let shapes: &[(usize, usize, usize)] = &[
        (16, 6144, 4096),
        (64, 6144, 4096),
        (64, 28672, 4096),
        (64, 4096, 14336),
        (2048, 28672, 4096),
        (2048, 4096, 14336),
        (2048, 6144, 4096),
    ];
    for &(m, n, k) in shapes {
        let x = b.random(m * k);
        let w = b.random(n * k);
        let (xh, wh) = (b.upload(&x), b.upload(&w));
        let rows = 4.min(m);
        let want = gemv::reference(&x[..rows * k], &w, None, rows, n, k);
        for (name, strategy) in matmul::candidates() {
            let y = b.poisoned(m * n);
            let run = |b: &Bench| {
                matmul::launch_with::<R, bf16>(&b.client, &strategy, &xh, &wh, &y, m, n, k)
            };
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(b)));
            if !matches!(ok, Ok(Ok(()))) {
                println!("| matmul {name:<28} | m={m} n={n} k={k} | unavailable |");
                continue;
            }
            let got = b.read(y.clone());
            // Reported, not asserted: a strategy may be wrong on a shape, and the sweep says so.
            let err = rel_err(&got[..rows * n], &want);
            let secs = b.time(10, |_| {
                run(b).expect("matmul");
            });
            let tflops = 2.0 * (m * n * k) as f64 / secs / 1e12;
            let gbps = (n * k * 2) as f64 / secs / 1e9;
            println!(
                "| matmul {name:<28} | m={m} n={n} k={k} | {:>9.1} | {tflops:>5.0} TFLOP/s | {:>5.1} % of copy (weight) | {err:.1e} |",
                secs * 1e6,
                100.0 * 2.0 * gbps / b.copy_gbps,
            );
            b.rows
                .push(serde_json::json!({"kernel": format!("matmul {name}"),
                "shape": format!("m={m} n={n} k={k}"), "us": secs * 1e6, "tflops": tflops,
                "rel_err": err}));
        }
    }
}

/// The decode projections of Llama-3.1-8B: (name, n, k, SwiGLU on a fused gate-up weight).
const DECODE_SHAPES: [(&str, usize, usize, bool); 5] = [
    ("qkv", 6144, 4096, false),
    ("o", 4096, 4096, false),
    ("gate_up", 14336, 4096, true),
    ("down", 4096, 14336, false),
    ("lm_head", 128256, 4096, false),
];

/// A decode projection's weight: several copies, so repeated runs stream from memory.
struct ProjWeight {
    w0: Vec<f32>,
    ws: Vec<Handle>,
    n: usize,
    k: usize,
    swiglu: bool,
}

impl ProjWeight {
    fn new(b: &mut Bench, n: usize, k: usize, swiglu: bool) -> Self {
        let w_rows = if swiglu { 2 * n } else { n };
        let copies = (400_000_000 / (w_rows * k * 2)).clamp(1, 4);
        let w0 = b.random(w_rows * k);
        let mut ws = vec![b.upload(&w0)];
        for _ in 1..copies {
            let w = b.random(w_rows * k);
            ws.push(b.upload(&w));
        }
        ProjWeight {
            w0,
            ws,
            n,
            k,
            swiglu,
        }
    }
    fn bytes(&self) -> f64 {
        ((if self.swiglu { 2 } else { 1 }) * self.n * self.k * 2) as f64
    }
}

/// `m` rows of input for a weight, and the reference of rows 0 and m − 1 (the host reference
/// of every row would take longer than the run).
struct ProjCase {
    x: Handle,
    y: Handle,
    want: Vec<f32>,
    m: usize,
}

impl ProjCase {
    fn new(b: &mut Bench, w: &ProjWeight, m: usize) -> Self {
        let (n, k) = (w.n, w.k);
        let x = b.random(m * k);
        let ends: Vec<f32> = [&x[..k], &x[(m - 1) * k..]].concat();
        let w_rows = if w.swiglu { 2 * n } else { n };
        let mut want = gemv::reference(&ends, &w.w0, None, 2, w_rows, k);
        if w.swiglu {
            want = silu_mul::reference(&want, n);
        }
        let (x, y) = (b.upload(&x), b.poisoned(m * n));
        ProjCase { x, y, want, m }
    }
    fn check(&self, b: &Bench, name: &str) -> f64 {
        let got = b.read(self.y.clone());
        let n = got.len() / self.m;
        let ends: Vec<f32> = [&got[..n], &got[(self.m - 1) * n..]].concat();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{name}: unwritten output"
        );
        b.check(name, &ends, &self.want, 1e-2)
    }
    fn mma_gemm(&self, b: &Bench, w: &ProjWeight, i: usize, tuning: mma_gemm::Tuning) {
        let ep = mma_gemm::Epilogue {
            swiglu: w.swiglu,
            ..Default::default()
        };
        let wh = &w.ws[i % w.ws.len()];
        let (m, n, k) = (self.m, w.n, w.k);
        mma_gemm::launch::<R, bf16>(&b.client, &self.x, wh, &self.y, m, n, k, ep, tuning);
    }
    /// cubek's GEMM on copy `i` of the weight, then SiLU·mul from `full` (`[m, 2·n]`) for a
    /// gate-up weight.
    fn cubek(&self, b: &Bench, w: &ProjWeight, i: usize, full: &Handle) {
        let wh = &w.ws[i % w.ws.len()];
        let (m, n, k) = (self.m, w.n, w.k);
        let out = if w.swiglu { full } else { &self.y };
        let w_rows = if w.swiglu { 2 * n } else { n };
        matmul::launch::<R, bf16>(&b.client, &self.x, wh, out, m, w_rows, k).expect("matmul");
        if w.swiglu {
            silu_mul::launch::<R, bf16>(&b.client, full, &self.y, m, n);
        }
    }
}

/// `mma_gemm` on the decode projections at 2–64 rows, beside the GEMV (≤ 8 rows, SwiGLU folded
/// in) and cubek's GEMM (plus SiLU·mul for gate-up) on the same data: µs per launch and the
/// weight's read rate as a share of the copy bandwidth.
fn bench_skinny(b: &mut Bench) {
    let shapes: Vec<(&str, usize, usize, bool)> = if b.quick {
        vec![("quick", 300, 512, false), ("quick_swiglu", 150, 512, true)]
    } else {
        DECODE_SHAPES.to_vec()
    };
    let rows: &[usize] = if b.quick {
        &[5, 40]
    } else {
        &[2, 4, 8, 16, 32, 64]
    };
    for (name, n, k, swiglu) in shapes {
        let w = ProjWeight::new(b, n, k, swiglu);
        for &m in rows {
            let case = ProjCase::new(b, &w, m);
            let tuning = mma_gemm::Tuning::for_device::<R, bf16>(&b.client, m, swiglu);
            case.mma_gemm(b, &w, 0, tuning);
            let err = case.check(b, "mma_gemm");
            let secs = b.time(20, |i| case.mma_gemm(b, &w, i, tuning));
            let shape = format!("{name} m={m} n={n} k={k}");
            b.record("mma_gemm", shape.clone(), secs, w.bytes(), err);
            if b.quick {
                // A two-stage ring and one split too, for the sanitizer.
                let other = mma_gemm::Tuning {
                    stages: 2,
                    splits: Some(1),
                    ..tuning
                };
                case.mma_gemm(b, &w, 0, other);
                let err = case.check(b, "mma_gemm");
                let secs = b.time(20, |i| case.mma_gemm(b, &w, i, other));
                let shape = format!("{shape} stages=2 splits=1");
                b.record("mma_gemm", shape, secs, w.bytes(), err);
            }
            let w_rows = if swiglu { 2 * n } else { n };
            let full = b.poisoned(m * w_rows);
            let run = |i: usize| {
                let wh = &w.ws[i % w.ws.len()];
                if m <= gemv::M_TILE {
                    let opts = gemv::Options {
                        swiglu,
                        ..Default::default()
                    };
                    let t = gemv::DEFAULT_TUNING;
                    gemv::launch_with::<R, bf16>(&b.client, &case.x, wh, &case.y, m, n, k, opts, t)
                } else {
                    case.cubek(b, &w, i, &full);
                }
            };
            let other = if m <= gemv::M_TILE {
                "gemv"
            } else {
                "matmul (cubek)"
            };
            run(0);
            let err = case.check(b, other);
            let secs = b.time(20, run);
            b.record(other, shape, secs, w.bytes(), err);
        }
    }
}

/// `mma_gemm`'s decode spread (planes × 16-row tiles per plane × K_STEPs per stage × stages,
/// and a forced number of `k` splits) on the decode projections at 16, 32 and 64 rows.
fn sweep_skinny(b: &mut Bench) {
    let tunings = [
        (4, 2, 2, 4, None),
        (4, 2, 2, 6, None),
        (4, 2, 4, 3, None),
        (2, 2, 2, 4, None),
        (4, 1, 2, 4, None),
        (8, 2, 2, 3, None),
        (8, 2, 2, 4, None),
        (8, 1, 4, 3, None),
        (8, 1, 2, 4, None),
        (4, 4, 2, 3, None),
        (4, 2, 2, 4, Some(1)),
        (4, 2, 2, 4, Some(2)),
    ];
    for (name, n, k, swiglu) in DECODE_SHAPES {
        let w = ProjWeight::new(b, n, k, swiglu);
        for m in [16usize, 32, 64] {
            let case = ProjCase::new(b, &w, m);
            for (planes, row_tiles, chunk_steps, stages, splits) in tunings {
                if swiglu && row_tiles % 2 == 1 {
                    continue;
                }
                let tuning = mma_gemm::Tuning {
                    planes,
                    x_planes: 1,
                    row_tiles,
                    x_tiles: 8,
                    chunk_steps,
                    stages,
                    splits,
                };
                case.mma_gemm(b, &w, 0, tuning);
                let err = case.check(b, "mma_gemm");
                let secs = b.time(20, |i| case.mma_gemm(b, &w, i, tuning));
                let sp = splits.map(|s| format!(" splits={s}")).unwrap_or_default();
                let shape = format!("{name} m={m} {planes}x{row_tiles}x{chunk_steps}x{stages}{sp}");
                b.record("mma_gemm sweep", shape, secs, w.bytes(), err);
            }
        }
    }
}

/// `mma_gemm`'s decode spread (`Tuning::for_device`) with a forced number of `k` splits, on the
/// decode projections at 4, 16 and 64 rows: what splitting buys against its partial sums and
/// their reduction (time it under Nsight Compute: scripts/gpu-ncu-times.sh).
fn sweep_splits(b: &mut Bench) {
    for (name, n, k, swiglu) in &DECODE_SHAPES[..4] {
        let w = ProjWeight::new(b, *n, *k, *swiglu);
        for m in [4usize, 16, 64] {
            let case = ProjCase::new(b, &w, m);
            for splits in [1usize, 2, 4, 5, 8, 11, 16] {
                let tuning = mma_gemm::Tuning {
                    splits: Some(splits),
                    ..mma_gemm::Tuning::for_device::<R, bf16>(&b.client, m, *swiglu)
                };
                case.mma_gemm(b, &w, 0, tuning);
                let err = case.check(b, "mma_gemm");
                let secs = b.time(20, |i| case.mma_gemm(b, &w, i, tuning));
                let shape = format!("{name} m={m} splits={splits}");
                b.record("mma_gemm splits", shape, secs, w.bytes(), err);
            }
        }
    }
}

/// The prefill projections of Llama-3.1-8B on a 2,048-token chunk: the tensor-core GEMM's
/// spreads (planes along the weight rows × along the rows of x, 16-row weight tiles × 8-row x
/// tiles per plane, K_STEPs per stage, stages) beside cubek's GEMM (plus SiLU·mul for gate-up):
/// TFLOP/s. torch's cuBLAS on the same shapes: scripts/gpu-kernels.sh.
fn sweep_prefill_gemm(b: &mut Bench) {
    let m = if b.quick { 300 } else { 2048 };
    let tunings = [
        (2, 2, 4, 8, 2, 3),
        (2, 2, 4, 4, 2, 3),
        (2, 2, 2, 8, 2, 3),
        (1, 2, 4, 8, 2, 3),
        (2, 1, 4, 8, 2, 3),
        (1, 4, 4, 4, 2, 3),
        (4, 1, 2, 8, 2, 3),
        (4, 2, 4, 8, 4, 2),
        (4, 2, 4, 8, 2, 3),
        (4, 2, 4, 8, 2, 4),
        (2, 4, 4, 8, 2, 3),
        // More warps a scheduler: 64 × 32 (or 32 × 64) planes in cubes of 8, 12 and 16 planes
        // (12 and 16 hold ptxas to 168 and 128 registers a thread).
        (2, 4, 4, 4, 2, 3),
        (4, 2, 4, 4, 2, 3),
        (3, 4, 4, 4, 2, 3),
        (3, 4, 2, 8, 2, 3),
        (4, 4, 4, 4, 2, 2),
    ];
    let shapes: Vec<(&str, usize, usize, bool)> = if b.quick {
        vec![("quick", 300, 512, false), ("quick_swiglu", 150, 512, true)]
    } else {
        DECODE_SHAPES[..4].to_vec()
    };
    for (name, n, k, swiglu) in shapes {
        let w = ProjWeight::new(b, n, k, swiglu);
        let case = ProjCase::new(b, &w, m);
        let shape = format!("{name} m={m} n={n} k={k}");
        let flops = gemm_flops(m, n, k, swiglu);
        let report = |b: &mut Bench, kernel: String, secs: f64, err: f64| {
            report_tflops(b, &kernel, &shape, flops, secs, err)
        };
        for (planes, x_planes, row_tiles, x_tiles, chunk_steps, stages) in tunings {
            let tuning = mma_gemm::Tuning {
                planes,
                x_planes,
                row_tiles,
                x_tiles,
                chunk_steps,
                stages,
                splits: None,
            };
            case.mma_gemm(b, &w, 0, tuning);
            let err = case.check(b, "tensor-core GEMM");
            let secs = b.time(10, |i| case.mma_gemm(b, &w, i, tuning));
            let spread =
                format!("gemm {planes}x{x_planes} {row_tiles}x{x_tiles} {chunk_steps}x{stages}");
            report(b, spread, secs, err);
        }
        let w_rows = if swiglu { 2 * n } else { n };
        let full = b.poisoned(m * w_rows);
        case.cubek(b, &w, 0, &full);
        let err = case.check(b, "matmul (cubek)");
        let secs = b.time(10, |i| case.cubek(b, &w, i, &full));
        report(b, "matmul (cubek)".into(), secs, err);
    }
}

/// `mma_gemm`'s prefill spread at 512 and 1,024 rows (one or two 256- or 512-token prompts),
/// unsplit and with `k` split in 2–4: whether splitting pays where a projection's cubes fill
/// less than a wave of the device (O at 512 rows: 128 cubes), its partial sums and their
/// reduction against the fuller wave (time it under Nsight Compute: scripts/gpu-ncu-times.sh).
fn sweep_prefill_splits(b: &mut Bench) {
    for (name, n, k, swiglu) in &DECODE_SHAPES[..4] {
        let w = ProjWeight::new(b, *n, *k, *swiglu);
        for m in [512usize, 1024] {
            let case = ProjCase::new(b, &w, m);
            let shape = format!("{name} m={m} n={n} k={k}");
            let flops = gemm_flops(m, *n, *k, *swiglu);
            for splits in [1usize, 2, 3, 4] {
                let tuning = mma_gemm::Tuning {
                    splits: Some(splits),
                    ..mma_gemm::PREFILL
                };
                case.mma_gemm(b, &w, 0, tuning);
                let err = case.check(b, "mma_gemm");
                let secs = b.time(10, |i| case.mma_gemm(b, &w, i, tuning));
                let kernel = format!("gemm PREFILL splits={splits}");
                report_tflops(b, &kernel, &shape, flops, secs, err);
            }
        }
    }
}

/// FLOPs of `x [m, k]` times a weight of `n` rows (twice `n` for a gate-up weight).
fn gemm_flops(m: usize, n: usize, k: usize, swiglu: bool) -> f64 {
    2.0 * (m * n * k * if swiglu { 2 } else { 1 }) as f64
}

/// Prints and records a GEMM's time as TFLOP/s.
fn report_tflops(b: &mut Bench, kernel: &str, shape: &str, flops: f64, secs: f64, err: f64) {
    let tflops = flops / secs / 1e12;
    println!(
        "| {kernel:<40} | {shape} | {:>9.1} | {tflops:>5.0} TFLOP/s | {err:.1e} |",
        secs * 1e6
    );
    b.rows.push(
        serde_json::json!({"kernel": kernel, "shape": shape, "us": secs * 1e6,
        "tflops": tflops, "rel_err": err}),
    );
}

/// ‖got − want‖ / ‖want‖.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn main() {
    let client = R::client(&CudaDevice::new(0));
    let mut b = Bench {
        client,
        rng: rand::rngs::StdRng::seed_from_u64(1),
        rows: Vec::new(),
        copy_gbps: 0.0,
        quick: std::env::var_os("KILN_SANITIZE").is_some(),
        iters: std::env::var("KILN_BENCH_ITERS")
            .ok()
            .and_then(|v| v.parse().ok()),
    };
    // The device's copy bandwidth (bytes read + written), measured beside this run (torch).
    // No default: a guessed rate once put an H200's shares against an H100's (NaN instead).
    b.copy_gbps = std::env::var("KILN_COPY_GBPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    if b.copy_gbps.is_nan() {
        println!("KILN_COPY_GBPS not set: no shares of the copy rate (NaN)\n");
    } else {
        println!(
            "copy bandwidth used as the floor: {:.0} GB/s (read + write)\n",
            b.copy_gbps
        );
    }
    println!("| kernel                 | shape                              |   time µs |     GB/s | of copy | rel err |");
    println!("|------------------------|------------------------------------|-----------|----------|---------|---------|");
    // $KILN_BENCH_ONLY (comma-separated names) runs a subset.
    let only = std::env::var("KILN_BENCH_ONLY").ok();
    type BenchFn = fn(&mut Bench);
    let benches: [(&str, BenchFn); 20] = [
        ("rms_norm", bench_rms_norm),
        ("silu_mul", bench_silu_mul),
        ("step_kernels", bench_step_kernels),
        ("sample", bench_sample),
        ("matmul", bench_matmul),
        ("gemv", bench_gemv),
        ("gemv_swiglu", bench_gemv_swiglu),
        ("sweep_gemv", sweep_gemv),
        ("decode_attention", bench_decode_attention),
        ("decode_attention_fresh", bench_decode_attention_fresh),
        ("sweep_decode_attention", sweep_decode_attention),
        ("sweep_decode_tiles", sweep_decode_tiles),
        ("prefill_attention", bench_prefill_attention),
        ("sweep_prefill_attention", sweep_prefill_attention),
        ("sweep_matmul", sweep_matmul),
        ("skinny", bench_skinny),
        ("sweep_skinny", sweep_skinny),
        ("sweep_splits", sweep_splits),
        ("prefill_gemm", sweep_prefill_gemm),
        ("sweep_prefill_splits", sweep_prefill_splits),
    ];
    for (name, run) in benches {
        let wanted = only
            .as_ref()
            .is_none_or(|o| o.split(',').any(|n| n == name));
        if wanted && !(b.quick && name.starts_with("sweep")) {
            run(&mut b);
        }
    }
    if let Some(path) = std::env::var_os("KILN_BENCH_JSON") {
        let json = serde_json::json!({"copy_gb_per_s": b.copy_gbps, "results": b.rows});
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .expect("write JSON");
    }
}
