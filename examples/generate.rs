//! Streams a completion of `--prompt` to stdout (raw text continuation, no chat template).
//!
//!     cargo run --release --example generate -- --prompt "The capital of France is" --max-tokens 32
//!
//! Flags: --model PATH (a .gguf file or HF folder; default: SmolLM2-135M-Instruct, fetched into
//! the model cache by scripts/fetch-models.sh), --prompt TEXT, --max-tokens N (default 128),
//! --temperature T (default 0.7; 0 = greedy), --seed S. Only the generated text goes to stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use kiln::{Engine, Request, SamplingParams};

struct Args {
    model: Option<PathBuf>,
    prompt: String,
    max_tokens: usize,
    temperature: f32,
    seed: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: None,
        prompt: "Once upon a time".into(),
        max_tokens: 128,
        temperature: 0.7,
        seed: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num =
            |v: String, what: &str| v.parse().map_err(|_| format!("{what}: not a number: {v}"));
        match flag.as_str() {
            "--model" => args.model = Some(PathBuf::from(value()?)),
            "--prompt" => args.prompt = value()?,
            "--max-tokens" => args.max_tokens = num(value()?, "--max-tokens")?,
            "--temperature" => args.temperature = value()?.parse().map_err(|_| "--temperature: not a number".to_string())?,
            "--seed" => args.seed = Some(num(value()?, "--seed")? as u64),
            "-h" | "--help" => {
                return Err("usage: generate [--model PATH] [--prompt TEXT] [--max-tokens N] [--temperature T] [--seed S]".into())
            }
            other => return Err(format!("unknown flag {other} (see --help)")),
        }
    }
    Ok(args)
}

/// The default model, fetched into the cache by the project's script if it is not there yet.
fn default_model() -> Result<PathBuf, String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-models.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("smollm2")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "fetching the default model failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(dir).join("SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let model = match args.model {
        Some(m) => m,
        None => default_model()?,
    };
    let t0 = Instant::now();
    let engine = Engine::builder()
        .model(&model)
        .build()
        .map_err(|e| e.to_string())?;
    eprintln!("loaded {} in {:.2?}", model.display(), t0.elapsed());
    let sampling = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ..SamplingParams::default()
    };
    let t1 = Instant::now();
    let mut first = None;
    let mut n = 0usize;
    let mut stdout = std::io::stdout().lock();
    for chunk in engine
        .stream(Request::new(args.prompt).sampling(sampling))
        .map_err(|e| e.to_string())?
    {
        let chunk = chunk.map_err(|e| e.to_string())?;
        first.get_or_insert_with(|| t1.elapsed());
        n += 1;
        let _ = stdout.write_all(chunk.text.as_bytes());
        let _ = stdout.flush();
    }
    let _ = writeln!(stdout);
    let total = t1.elapsed();
    eprintln!(
        "{n} tokens in {total:.2?} (first after {:.2?}, {:.1} tok/s)",
        first.unwrap_or_default(),
        n as f64 / total.as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
