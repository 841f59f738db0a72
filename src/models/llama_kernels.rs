//! The Llama-family forward (same architectures as `llama.rs`) on kiln's own CubeCL kernels,
//! launched directly on device buffers: no Burn ops and no fusion layer on the hot path.
//! Generic over the CubeCL runtime (CUDA in the engine, wgpu in CI) and the element type.
//!
//! Per layer at one row (five or six launches): Q/K/V GEMV (one fused weight) with the RMSNorm
//! folded in (+bias) → [Q/K RMSNorm] → paged attention with RoPE and the KV write folded in
//! (reading the fused rows; + its merge at longer contexts) → O GEMV adding into the residual
//! stream → gate-up GEMV with the RMSNorm folded in and SiLU·mul → down GEMV adding into the
//! residual stream. At 3–64 rows on tensor cores kiln's `mma` GEMM takes the GEMVs' place
//! (bias, SwiGLU and the residual add in its epilogue, each norm a launch of its own, a second
//! launch where `k` is split). Steps with prompt chunks run RoPE + KV write as a kernel of its
//! own. Larger batches run a fused add+RMSNorm kernel before cubek's GEMMs (bias projections:
//! the `mma` GEMM).
//! Attention: one-token chunks (decode) run the split-K paged decode kernel, longer chunks
//! (prefill, chunked prefill) the tiled causal kernel on tensor cores; logits are computed for
//! the sampled rows only.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use kiln_kernels::cubecl::bytes::Bytes;
use kiln_kernels::cubecl::future;
use kiln_kernels::cubecl::prelude::*;
use kiln_kernels::cubecl::server::{Handle, ServerError};
use kiln_kernels::rope_kv_write::Projections;
use kiln_kernels::{
    argmax, deferred_tokens, embedding, gemv, matmul, mma_gemm,
    paged_decode_attention as decode_attention, prefill_attention, rms_norm, rope_kv_write, sample,
    silu_mul,
};

use super::config::Config;
use crate::error::{Error, Result};
use crate::loader::weights::Weights;
use crate::ops::rope::cos_sin_tables;
use crate::runner::batch::Batch;
use crate::runner::{Forward, Readback, StepOutput};

/// Which kernel runs a projection, by the rows of the batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The GEMV (one or two rows, or up to its tile where the `mma` GEMM does not run): RMSNorm,
    /// SwiGLU and the residual add folded in.
    Gemv,
    /// kiln's GEMM on tensor cores (3 rows and more): bias, SwiGLU and the residual add folded
    /// in, the norm a launch of its own.
    Mma,
    /// cubek's GEMM (devices without `mma`), with norm, SiLU·mul and residual add as launches
    /// of their own.
    Gemm,
}

struct Proj {
    /// `[out, in]`, row-major (HF layout: one weight row per output).
    w: Handle,
    b: Option<Handle>,
    out: usize,
    inp: usize,
}

/// The weights of the projections that read a normalized residual stream (Q/K/V, gate-up) have
/// the norm's weight multiplied into their columns, so the GEMVs fold the norm in and prefill
/// normalizes with a unit weight.
struct Layer {
    /// Q, K and V rows in one weight `[(heads + 2·kv_heads)·head_dim, hidden]`: one projection
    /// for all three. `q`, `k`, `v` are views into it, for Qwen3's per-head Q/K norms, which
    /// need each output contiguous across tokens.
    qkv: Proj,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    q_norm: Option<Handle>,
    k_norm: Option<Handle>,
    /// Gate rows then up rows: `[2 · intermediate, hidden]`.
    gate_up: Proj,
    down: Proj,
}

/// The residual stream of a forward: its rows, and the last block's output not yet added to
/// them, which the next norm adds (GEMVs and unsplit `mma` GEMMs add theirs in place).
struct Stream {
    residual: Handle,
    pending: Option<BlockOutput>,
}

/// A block's output waiting for the next norm.
enum BlockOutput {
    /// Rows of the model's type (cubek's GEMM cannot add).
    Rows(Handle),
    /// A split `mma` GEMM's partial sums: the norm adds them up instead of a launch of their own.
    Partials(mma_gemm::Partials),
}

/// The `N` outputs of `N` projections as an array.
fn exactly<const N: usize>(outs: Vec<Handle>) -> Result<[Handle; N]> {
    outs.try_into()
        .map_err(|v: Vec<Handle>| Error::Device(format!("{} outputs where {N} were due", v.len())))
}

/// A device-to-host copy queued behind a step's kernels.
type Read = Pin<Box<dyn Future<Output = std::result::Result<Vec<Bytes>, ServerError>> + Send>>;

/// A submitted step not yet collected: its rows' copy to the host, if it has rows.
struct Pending {
    read: Option<Read>,
    readback: Readback,
    rows: usize,
}

/// A model's weights and KV pool on a CubeCL device.
pub struct KernelLlama<R: Runtime, F: Float + CubeElement> {
    client: ComputeClient<R>,
    /// The same client, borrowed for the program's life: a queued read's future borrows the
    /// client it was made from, and it must outlive `submit` to be waited on in `collect`.
    /// (CubeCL keeps a device's client for the program's life anyway.)
    reader: &'static ComputeClient<R>,
    pending: VecDeque<Pending>,
    /// The last greedy step's tokens on the device: the next step's deferred inputs.
    last_tokens: Option<Handle>,
    config: Config,
    embed: Handle,
    lm_head: Proj,
    norm: Handle,
    /// All ones `[hidden]`: the prefill norms' weight (the real ones are folded into weights).
    unit_norm: Handle,
    layers: Vec<Layer>,
    cos: Handle,
    sin: Handle,
    max_positions: usize,
    k_cache: Vec<Handle>,
    v_cache: Vec<Handle>,
    block_size: usize,
    prefill_tiling: prefill_attention::Tiling,
    _elem: PhantomData<F>,
}

impl<R: Runtime, F: Float + CubeElement> KernelLlama<R, F> {
    /// Uploads the weights and allocates a KV pool of `num_blocks` blocks of `block_size` tokens.
    pub fn load(
        client: ComputeClient<R>,
        weights: &Weights,
        config: &Config,
        max_positions: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        let c = config;
        let up = |v: &[f32]| -> Handle {
            let data: Vec<F> = v.iter().map(|&x| F::new(x)).collect();
            client.create_from_slice(F::as_bytes(&data))
        };
        let tensor = |name: &str, shape: &[usize]| -> Result<Handle> {
            Ok(up(&weights.tensor(name, shape, c)?.data))
        };
        let proj = |prefix: &str, inp: usize, out: usize, bias: bool| -> Result<Proj> {
            Ok(Proj {
                w: tensor(&format!("{prefix}.weight"), &[out, inp])?,
                b: if bias {
                    Some(tensor(&format!("{prefix}.bias"), &[out])?)
                } else {
                    None
                },
                out,
                inp,
            })
        };
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let es = size_of::<F>() as u64;
        // `w` `[rows, h]` with its columns scaled by `gamma` (a norm's weight folded in).
        let fold = |mut w: Vec<f32>, gamma: &[f32]| -> Vec<f32> {
            w.chunks_mut(h)
                .for_each(|row| row.iter_mut().zip(gamma).for_each(|(x, g)| *x *= g));
            w
        };
        // The fused Q/K/V projection of layer `p` (norm weight `gamma` folded in), and Q, K, V
        // as views into its buffers.
        let fused_qkv = |p: &str, gamma: &[f32]| -> Result<(Proj, [Proj; 3])> {
            let outs = [c.num_heads * hd, c.num_kv_heads * hd, c.num_kv_heads * hd];
            let (mut w, mut b) = (Vec::new(), Vec::new());
            for (name, &out) in ["q_proj", "k_proj", "v_proj"].iter().zip(&outs) {
                let prefix = format!("{p}.self_attn.{name}");
                w.extend(
                    weights
                        .tensor(&format!("{prefix}.weight"), &[out, h], c)?
                        .data,
                );
                if c.qkv_bias {
                    b.extend(weights.tensor(&format!("{prefix}.bias"), &[out], c)?.data);
                }
            }
            let fused = Proj {
                w: up(&fold(w, gamma)),
                b: c.qkv_bias.then(|| up(&b)),
                out: outs.iter().sum(),
                inp: h,
            };
            let view = |first: usize, out: usize| Proj {
                w: fused.w.clone().offset_start((first * h) as u64 * es),
                b: fused.b.clone().map(|b| b.offset_start(first as u64 * es)),
                out,
                inp: h,
            };
            let views = [
                view(0, outs[0]),
                view(outs[0], outs[1]),
                view(outs[0] + outs[1], outs[2]),
            ];
            Ok((fused, views))
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let gate = weights.tensor(&format!("{p}.mlp.gate_proj.weight"), &[inter, h], c)?;
            let upw = weights.tensor(&format!("{p}.mlp.up_proj.weight"), &[inter, h], c)?;
            let gamma = |n: &str| -> Result<Vec<f32>> {
                Ok(weights.tensor(&format!("{p}.{n}.weight"), &[h], c)?.data)
            };
            let gate_up = fold(
                [gate.data, upw.data].concat(),
                &gamma("post_attention_layernorm")?,
            );
            let norm = |n: &str, dim: usize| tensor(&format!("{p}.{n}.weight"), &[dim]);
            let (qkv, [q, k, v]) = fused_qkv(&p, &gamma("input_layernorm")?)?;
            layers.push(Layer {
                q,
                k,
                v,
                qkv,
                o: proj(&format!("{p}.self_attn.o_proj"), c.num_heads * hd, h, false)?,
                q_norm: c
                    .qk_norm
                    .then(|| norm("self_attn.q_norm", hd))
                    .transpose()?,
                k_norm: c
                    .qk_norm
                    .then(|| norm("self_attn.k_norm", hd))
                    .transpose()?,
                gate_up: Proj {
                    w: up(&gate_up),
                    b: None,
                    out: 2 * inter,
                    inp: h,
                },
                down: proj(&format!("{p}.mlp.down_proj"), inter, h, false)?,
            });
        }
        let embed = tensor("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = Proj {
            w: if c.tie_word_embeddings || !weights.has("lm_head.weight") {
                embed.clone()
            } else {
                tensor("lm_head.weight", &[c.vocab_size, h])?
            },
            b: None,
            out: c.vocab_size,
            inp: h,
        };
        let (cos, sin) = cos_sin_tables(c, max_positions);
        let kv_bytes = num_blocks * block_size * c.num_kv_heads * hd * size_of::<F>();
        let cache = || {
            (0..c.num_layers)
                .map(|_| client.empty(kv_bytes))
                .collect::<Vec<_>>()
        };
        Ok(Self {
            embed,
            lm_head,
            norm: tensor("model.norm.weight", &[h])?,
            unit_norm: up(&vec![1.0; h]),
            layers,
            cos: client.create_from_slice(f32::as_bytes(&cos)),
            sin: client.create_from_slice(f32::as_bytes(&sin)),
            max_positions,
            k_cache: cache(),
            v_cache: cache(),
            block_size,
            prefill_tiling: prefill_attention::Tiling::for_device::<R, F>(
                &client,
                prefill_attention::Shape {
                    heads: c.num_heads,
                    kv_heads: c.num_kv_heads,
                    head_dim: hd,
                    block_size,
                },
            ),
            config: config.clone(),
            reader: Box::leak(Box::new(client.clone())),
            pending: VecDeque::new(),
            last_tokens: None,
            client,
            _elem: PhantomData,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The kernel for `rows` rows of `k` inputs. Two rows stay on the GEMV: on the H200 its
    /// gate-up and lm_head ran 81 and 263 µs there against the `mma` GEMM's 104 and 348
    /// (benches/RESULTS.md), from 4 rows on the `mma` GEMM wins; with `ldmatrix` fragments it
    /// also ran Llama-3.1-8B's 2,048-row prefill projections 1.2–1.5× faster than cubek's GEMM,
    /// which keeps only devices without `mma` (and `k` off its step).
    fn path(&self, rows: usize, k: usize) -> Path {
        if rows >= 3 && mma_gemm::supported::<R, F>(&self.client, rows, k) {
            Path::Mma
        } else if rows <= gemv::M_TILE {
            Path::Gemv
        } else {
            Path::Gemm
        }
    }

    /// `y` `[rows, n]` from `x` `[rows, p.inp]` and `p`'s weight on the `mma` GEMM, with
    /// `epilogue` and the device's spread for that many rows (`Tuning::for_device`); the
    /// partial sums where the epilogue deferred a split.
    fn mma_gemm(
        &self,
        x: &Handle,
        p: &Proj,
        y: &Handle,
        rows: usize,
        n: usize,
        epilogue: mma_gemm::Epilogue,
    ) -> Option<mma_gemm::Partials> {
        let tuning = mma_gemm::Tuning::for_device::<R, F>(&self.client, rows, epilogue.swiglu);
        let (cl, k) = (&self.client, p.inp);
        mma_gemm::launch::<R, F>(cl, x, &p.w, y, rows, n, k, epilogue, tuning)
    }

    /// `x` `[rows, p.inp]` through projection `p`: the GEMV while the weight read dominates,
    /// the tensor-core GEMMs beyond (bias projections of large batches on the GEMV where the
    /// device lacks `mma`: cubek's GEMM adds no bias).
    fn project(&self, x: &Handle, p: &Proj, rows: usize) -> Result<Handle> {
        let y = self.client.empty(rows * p.out * size_of::<F>());
        let path = self.path(rows, p.inp);
        if path == Path::Mma {
            let epilogue = mma_gemm::Epilogue {
                bias: p.b.as_ref(),
                ..Default::default()
            };
            self.mma_gemm(x, p, &y, rows, p.out, epilogue);
        } else if path == Path::Gemm && p.b.is_none() {
            matmul::launch::<R, F>(&self.client, x, &p.w, &y, rows, p.out, p.inp)
                .map_err(Error::Device)?;
        } else {
            gemv::launch::<R, F>(&self.client, x, &p.w, p.b.as_ref(), &y, rows, p.out, p.inp);
        }
        Ok(y)
    }

    /// `projs` (norm weight folded in) applied to the RMSNorm of the residual stream, after
    /// adding the stream's pending block output. At decode sizes the GEMVs fold the norm in (no
    /// launch of its own, no normalized copy); beyond that one fused add+norm kernel writes the
    /// normalized rows for the GEMMs. `swiglu`: `projs` is one fused gate-up projection and the
    /// result is its SwiGLU activation.
    fn normed_projections(
        &self,
        s: &mut Stream,
        projs: &[&Proj],
        rows: usize,
        swiglu: bool,
    ) -> Result<Vec<Handle>> {
        let cl = &self.client;
        let (es, h) = (size_of::<F>(), self.config.hidden_size);
        let eps = self.config.rms_norm_eps as f32;
        let out_cols = |p: &Proj| if swiglu { p.out / 2 } else { p.out };
        let path = self.path(rows, h);
        // (A pending output, which the GEMVs cannot add, takes the norm kernel.)
        if path == Path::Gemv && s.pending.is_none() {
            return Ok(projs
                .iter()
                .map(|p| {
                    let y = cl.empty(rows * out_cols(p) * es);
                    let opts = gemv::Options {
                        bias: p.b.as_ref(),
                        rms_eps: Some(eps),
                        swiglu,
                        accumulate: false,
                    };
                    let tuning = gemv::DEFAULT_TUNING;
                    let n = out_cols(p);
                    gemv::launch_with::<R, F>(cl, &s.residual, &p.w, &y, rows, n, h, opts, tuning);
                    y
                })
                .collect());
        }
        let normed = cl.empty(rows * h * es);
        self.add_and_norm(s, &self.unit_norm, &normed, rows);
        projs
            .iter()
            .map(|p| {
                if swiglu && path == Path::Mma {
                    let y = cl.empty(rows * out_cols(p) * es);
                    let epilogue = mma_gemm::Epilogue {
                        swiglu,
                        ..Default::default()
                    };
                    self.mma_gemm(&normed, p, &y, rows, out_cols(p), epilogue);
                    return Ok(y);
                }
                let y = self.project(&normed, p, rows)?;
                if !swiglu {
                    return Ok(y);
                }
                let act = cl.empty(rows * out_cols(p) * es);
                silu_mul::launch::<R, F>(cl, &y, &act, rows, out_cols(p));
                Ok(act)
            })
            .collect()
    }

    /// Adds the stream's pending block output (if any) into its rows, then writes their
    /// RMSNorm with `weight` to `out`.
    fn add_and_norm(&self, s: &mut Stream, weight: &Handle, out: &Handle, rows: usize) {
        let (cl, h) = (&self.client, self.config.hidden_size);
        let eps = self.config.rms_norm_eps as f32;
        let res = &s.residual;
        match s.pending.take() {
            None => rms_norm::launch::<R, F>(cl, res, None, weight, out, rows, h, eps),
            Some(BlockOutput::Rows(y)) => {
                rms_norm::launch::<R, F>(cl, &y, Some(res), weight, out, rows, h, eps)
            }
            Some(BlockOutput::Partials(p)) => {
                rms_norm::launch_partials::<R, F>(cl, &p, res, weight, out, rows, h, eps)
            }
        }
    }

    /// A block's output projection `p` of `x`: added into the residual stream in place by the
    /// GEMV or the `mma` GEMM, else left pending for the next norm (a split `mma` GEMM's
    /// partial sums; cubek's GEMM cannot add).
    fn residual_projection(&self, s: &mut Stream, x: &Handle, p: &Proj, rows: usize) -> Result<()> {
        let path = self.path(rows, p.inp);
        if path == Path::Mma {
            let epilogue = mma_gemm::Epilogue {
                accumulate: true,
                defer_split: true,
                ..Default::default()
            };
            s.pending = self
                .mma_gemm(x, p, &s.residual, rows, p.out, epilogue)
                .map(BlockOutput::Partials);
        } else if path == Path::Gemv {
            let opts = gemv::Options {
                accumulate: true,
                ..Default::default()
            };
            let tuning = gemv::DEFAULT_TUNING;
            gemv::launch_with::<R, F>(
                &self.client,
                x,
                &p.w,
                &s.residual,
                rows,
                p.out,
                p.inp,
                opts,
                tuning,
            );
        } else {
            s.pending = Some(BlockOutput::Rows(self.project(x, p, rows)?));
        }
        Ok(())
    }

    fn u32s(&self, v: &[u32]) -> Handle {
        self.client.create_from_slice(u32::as_bytes(v))
    }
}

impl<R: Runtime, F: Float + CubeElement> Forward for KernelLlama<R, F> {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Queues one forward over the flat batch, then its rows' copy to the host: the logits, or
    /// the greedy tokens picked on the device.
    fn submit(&mut self, batch: &Batch, readback: Readback) -> Result<()> {
        let c = &self.config;
        let cl = &self.client;
        let t = batch.num_tokens();
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (heads, kvh) = (c.num_heads, c.num_kv_heads);
        let es = size_of::<F>();
        if let Some(&p) = batch.positions.iter().find(|&&p| p >= self.max_positions) {
            return Err(Error::Device(format!(
                "position {p} beyond the RoPE table ({})",
                self.max_positions
            )));
        }

        // Attention work: one-token chunks (decode) go to the split-K decode kernel, longer
        // chunks (prefill) to the tiled causal kernel; each writes its own rows.
        let max_blocks = batch
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let table_row = |s: &crate::runner::batch::SeqChunk| {
            let mut row = vec![0u32; max_blocks];
            row[..s.block_table.len()].copy_from_slice(&s.block_table);
            row
        };
        let (mut dec_rows, mut dec_tables, mut dec_ctx) = (Vec::new(), Vec::new(), Vec::new());
        let (mut chunks, mut pre_tables) = (Vec::new(), Vec::new());
        for s in &batch.seqs {
            let first_pos = batch.positions[s.start];
            if s.len == 1 {
                dec_rows.push(s.start as u32);
                dec_tables.extend(table_row(s));
                dec_ctx.push(first_pos as u32 + 1);
            } else {
                chunks.push(prefill_attention::Chunk {
                    table_row: pre_tables.len() / max_blocks,
                    first_token: s.start,
                    len: s.len,
                    first_pos,
                });
                pre_tables.extend(table_row(s));
            }
        }
        let decode = (!dec_rows.is_empty()).then(|| {
            let max_ctx = dec_ctx.iter().copied().max().unwrap_or(1) as usize;
            let ws = decode_attention::Workspace::new::<R, F>(
                cl,
                dec_rows.len(),
                kvh,
                heads,
                hd,
                max_ctx,
            );
            let meta = [&dec_rows, &dec_tables, &dec_ctx].map(|v| self.u32s(v));
            (ws, meta)
        });
        let tile_plan = prefill_attention::tiles(&chunks, self.prefill_tiling.tile_rows());
        let prefill = (!chunks.is_empty()).then(|| (self.u32s(&tile_plan), self.u32s(&pre_tables)));
        let decode_shape = decode_attention::Shape {
            kv_heads: kvh,
            group: heads / kvh,
            head_dim: hd,
            block_size: self.block_size,
            max_blocks,
        };
        let prefill_shape = prefill_attention::Shape {
            heads,
            kv_heads: kvh,
            head_dim: hd,
            block_size: self.block_size,
        };
        let positions: Vec<u32> = batch.positions.iter().map(|&p| p as u32).collect();
        let slots: Vec<u32> = batch.slot_mapping.iter().map(|&s| s as u32).collect();
        let (ids, positions, slots) = (
            self.u32s(&batch.token_ids),
            self.u32s(&positions),
            self.u32s(&slots),
        );
        if !batch.deferred.is_empty() {
            let previous = self.last_tokens.as_ref().ok_or_else(|| {
                Error::Device("deferred tokens without a greedy step before".into())
            })?;
            let at: Vec<u32> = batch.deferred.iter().map(|d| d.index as u32).collect();
            let rows: Vec<u32> = batch.deferred.iter().map(|d| d.prev_row as u32).collect();
            let (at, rows) = (self.u32s(&at), self.u32s(&rows));
            deferred_tokens::launch(cl, &ids, &at, &rows, previous, batch.deferred.len());
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let eps = c.rms_norm_eps as f32;

        let residual = cl.empty(t * h * es);
        embedding::launch::<R, F>(cl, &self.embed, &ids, &residual, t, h);
        let mut stream = Stream {
            residual,
            pending: None,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            // Q/K/V from the one fused projection (each token's row is [q | k | v]; K and V
            // are views into it), except where per-head Q/K norms (Qwen3) need each part
            // contiguous across tokens.
            let fused = t == 1 || layer.q_norm.is_none();
            let (q_width, kv_width) = (layer.q.out, layer.k.out);
            let projections = if fused {
                let [qkv] =
                    exactly(self.normed_projections(&mut stream, &[&layer.qkv], t, false)?)?;
                Projections::fused(&qkv, q_width, kv_width, es)
            } else {
                let projs = [&layer.q, &layer.k, &layer.v];
                let [q, k, v] = exactly(self.normed_projections(&mut stream, &projs, t, false)?)?;
                Projections::separate(q, k, v, q_width, kv_width)
            };
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                let (q, k) = (&projections.q, &projections.k);
                rms_norm::launch::<R, F>(cl, q, None, qn, q, t * heads, hd, eps);
                rms_norm::launch::<R, F>(cl, k, None, kn, k, t * kvh, hd, eps);
            }
            // Decode-only steps fold RoPE and the KV write into the attention kernel; steps
            // with prompt chunks rotate Q and write K/V for every token first.
            let q_rot = prefill.is_some().then(|| cl.empty(t * heads * hd * es));
            if let Some(q_rot) = &q_rot {
                let step = rope_kv_write::Step {
                    projections: &projections,
                    positions: &positions,
                    slots: &slots,
                    tokens: t,
                    q_out: q_rot,
                };
                rope_kv_write::launch::<R, F>(
                    cl,
                    step,
                    &self.k_cache[i],
                    &self.v_cache[i],
                    &self.cos,
                    &self.sin,
                    heads,
                    kvh,
                    hd,
                );
            }
            let attn = cl.empty(t * heads * hd * es);
            if let Some((ws, [rows, tables, ctx])) = &decode {
                let queries = decode_attention::Queries {
                    count: dec_rows.len(),
                    rows,
                    block_tables: tables,
                    context_lens: ctx,
                };
                let query = match &q_rot {
                    Some(q_rot) => decode_attention::Query::Rotated(q_rot),
                    None => decode_attention::Query::Fresh(decode_attention::Fresh {
                        projections: &projections,
                        cos: &self.cos,
                        sin: &self.sin,
                    }),
                };
                let (kc, vc) = (&self.k_cache[i], &self.v_cache[i]);
                decode_attention::launch::<R, F>(
                    cl,
                    decode_shape,
                    queries,
                    query,
                    kc,
                    vc,
                    &attn,
                    ws,
                    scale,
                );
            }
            if let (Some((plan, tables)), Some(q_rot)) = (&prefill, &q_rot) {
                prefill_attention::launch::<R, F>(
                    cl,
                    prefill_shape,
                    self.prefill_tiling,
                    plan,
                    tile_plan.len() / 4,
                    q_rot,
                    &self.k_cache[i],
                    &self.v_cache[i],
                    tables,
                    max_blocks,
                    &attn,
                    scale,
                );
            }
            self.residual_projection(&mut stream, &attn, &layer.o, t)?;
            let gate_up = [&layer.gate_up];
            let [act] = exactly(self.normed_projections(&mut stream, &gate_up, t, true)?)?;
            self.residual_projection(&mut stream, &act, &layer.down, t)?;
        }
        let n = batch.logit_indices.len();
        if n == 0 {
            // A prompt chunk before the last: its K/V writes are queued, no rows are due.
            self.pending.push_back(Pending {
                read: None,
                readback,
                rows: 0,
            });
            return Ok(());
        }
        let normed = cl.empty(t * h * es);
        self.add_and_norm(&mut stream, &self.norm, &normed, t);
        let rows: Vec<u32> = batch.logit_indices.iter().map(|&i| i as u32).collect();
        let picked = cl.empty(n * h * es);
        embedding::launch::<R, F>(cl, &normed, &self.u32s(&rows), &picked, n, h);
        let logits = self.project(&picked, &self.lm_head, n)?;
        let out = match readback {
            Readback::Logits => logits,
            Readback::Greedy | Readback::Sampled => {
                let tokens = cl.empty(n * size_of::<u32>());
                if readback == Readback::Greedy {
                    argmax::launch::<R, F>(cl, &logits, &tokens, n, c.vocab_size);
                } else if batch.sampling.len() == n {
                    sample::launch::<R, F>(cl, &logits, &batch.sampling, &tokens, c.vocab_size);
                } else {
                    return Err(Error::Device(format!(
                        "{} sampling settings for {n} rows",
                        batch.sampling.len()
                    )));
                }
                self.last_tokens = Some(tokens.clone());
                tokens
            }
        };
        self.pending.push_back(Pending {
            read: Some(Box::pin(self.reader.read_async(vec![out]))),
            readback,
            rows: n,
        });
        Ok(())
    }

    /// Waits for the oldest submitted step's rows.
    fn collect(&mut self) -> Result<StepOutput> {
        let p = self
            .pending
            .pop_front()
            .ok_or_else(|| Error::Device("collect without a submitted step".into()))?;
        let Some(read) = p.read else {
            return Ok(match p.readback {
                Readback::Greedy | Readback::Sampled => StepOutput::Tokens(Vec::new()),
                Readback::Logits => StepOutput::Logits(Vec::new()),
            });
        };
        let parts = future::block_on(read)
            .map_err(|e| Error::Device(format!("reading the step's rows: {e:?}")))?;
        let bytes: &[u8] = parts.first().map_or(&[], |b| b);
        Ok(match p.readback {
            Readback::Greedy | Readback::Sampled => {
                StepOutput::Tokens(u32::from_bytes(bytes).to_vec())
            }
            Readback::Logits => {
                let mut out: Vec<f32> = F::from_bytes(bytes)
                    .iter()
                    .map(|x| x.to_f32().unwrap_or(f32::NAN))
                    .collect();
                out.truncate(p.rows * self.config.vocab_size);
                StepOutput::Logits(out)
            }
        })
    }
}
