//! Choosing each sequence's next token from its logits: penalties, temperature, top-k/top-p/min-p,
//! seeded draws, and log-probabilities (of the model's raw distribution, as vLLM reports them).

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kiln_kernels::sample::Settings;

use crate::engine::request::{Logprobs, SamplingParams, TokenLogprob};

/// A sequence's sampling state: its parameters, its random stream and the tokens it has seen.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of prompt and output, for the repetition penalty.
    seen: HashSet<u32>,
    /// Occurrences of each output token, for presence/frequency penalties.
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            seen: prompt.iter().copied().collect(),
            output_counts: HashMap::new(),
        }
    }

    /// Whether the next token is the plain argmax of the logits (no temperature, penalties or
    /// log-probabilities), which the device can choose without the logits reaching the host.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 && self.samples_on_device()
    }

    /// Whether the device can draw the next token (no penalties or log-probabilities, which
    /// need the logits on the host).
    pub fn samples_on_device(&self) -> bool {
        let p = &self.params;
        p.logprobs.is_none()
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
    }

    /// The next draw's settings for the device: its uniform number comes from this sequence's
    /// stream, one per token, as a host draw takes it.
    pub fn device_settings(&mut self) -> Settings {
        let p = &self.params;
        if p.temperature == 0.0 {
            return Settings::GREEDY;
        }
        Settings {
            inv_temperature: 1.0 / p.temperature,
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            min_p: p.min_p,
            uniform: self.rng.random::<f32>(),
        }
    }

    /// Records a token chosen elsewhere (on the device) as this sequence's next.
    pub fn record(&mut self, token: u32) {
        self.seen.insert(token);
        *self.output_counts.entry(token).or_default() += 1;
    }

    /// Picks the next token from `logits` (one row, f32) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> (u32, Option<Logprobs>) {
        let raw_logprobs = self.params.logprobs.map(|_| log_softmax(logits));
        self.apply_penalties(logits);
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let logprobs = raw_logprobs.map(|lp| {
            let n = self.params.logprobs.unwrap_or(0);
            Logprobs {
                chosen: TokenLogprob {
                    token_id: token,
                    logprob: lp[token as usize],
                },
                top: top_n(&lp, n),
            }
        });
        self.record(token);
        (token, logprobs)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = logits[order[0]] / p.temperature;
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&i| (logits[i] / p.temperature - max).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            probs.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return order[i] as u32;
            }
            r -= x;
        }
        order[probs.len() - 1] as u32
    }
}

/// Index of the largest logit (the first, on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits
        .iter()
        .map(|&x| ((x - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    logits.iter().map(|&x| x - lse).collect()
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<usize> = (0..logprobs.len()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| logprobs[b].total_cmp(&logprobs[a]));
    idx.truncate(n);
    idx.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| TokenLogprob {
            token_id: i as u32,
            logprob: logprobs[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            seed: Some(1),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn device_settings_carry_the_params_and_a_seeded_draw() {
        let p = SamplingParams {
            temperature: 0.5,
            top_k: 7,
            top_p: 0.9,
            min_p: 0.1,
            ..params()
        };
        let (mut a, mut b) = (Sampler::new(p.clone(), &[]), Sampler::new(p, &[]));
        assert!(a.samples_on_device() && !a.is_greedy());
        let s = a.device_settings();
        assert_eq!(
            (s.inv_temperature, s.top_k, s.top_p, s.min_p),
            (2.0, 7, 0.9, 0.1)
        );
        assert!((0.0..1.0).contains(&s.uniform));
        assert_eq!(b.device_settings(), s, "same seed, same draw");
        assert_ne!(a.device_settings().uniform, s.uniform, "one draw per token");
        let greedy = Sampler::new(SamplingParams::greedy(), &[]).device_settings();
        assert_eq!(greedy, Settings::GREEDY);
        let penalized = SamplingParams {
            repetition_penalty: 1.2,
            ..params()
        };
        assert!(!Sampler::new(penalized, &[]).samples_on_device());
    }

    #[test]
    fn greedy_takes_argmax_and_reports_logprobs() {
        let p = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, &[]);
        let (t, lp) = s.sample(&mut [0.0, 2.0, 1.0]);
        assert_eq!(t, 1);
        let lp = lp.unwrap();
        // log_softmax([0, 2, 1])[1] = 2 - ln(1 + e² + e)
        let expected = 2.0 - (1.0f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp.chosen.logprob - expected).abs() < 1e-6);
        assert_eq!(
            lp.top.iter().map(|t| t.token_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 1,
                ..params()
            },
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.5, 0.1, 3.0, 2.9]).0, 2);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ≈ [0.665, 0.245, 0.09]: top_p 0.6 keeps only token 0.
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.6,
                ..params()
            },
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [2.0, 1.0, 0.0]).0, 0);
        }
        // min_p 0.5: token 1 (0.245 < 0.5 · 0.665) is dropped too.
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.5,
                ..params()
            },
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [2.0, 1.0, 0.0]).0, 0);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let draw = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed: Some(seed),
                    ..params()
                },
                &[],
            );
            (0..32)
                .map(|_| s.sample(&mut [1.0, 1.0, 1.0, 1.0]).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn penalties_follow_vllm() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, &[0]);
        s.output_counts.insert(1, 2);
        s.seen.insert(1);
        let mut logits = [3.0, -1.0, 0.5];
        s.apply_penalties(&mut logits);
        // token 0: 3 / 2; token 1: -1 · 2 - 0.5 - 0.25 · 2; token 2 untouched.
        assert_eq!(logits, [1.5, -3.0, 0.5]);
    }
}
