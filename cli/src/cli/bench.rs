//! `troupe bench forward|engine|grammar|perplexity`: the subcommands, their runs
//! and the tables they print (each also writes its report as JSON with `--json`).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use troupe::bench::engine::EngineBench;
use troupe::bench::forward::ForwardBench;
use troupe::model::WeightsMode;
use troupe::KvDtype;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill, decode and batched decode of the forward, against
    /// candle-transformers and the machine's f32 GEMM ceiling.
    Forward {
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Batch sizes of the batched decode measure.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16, 32, 64])]
        batch_sizes: Vec<usize>,
        /// Decode steps timed per batch size.
        #[arg(long, default_value_t = 6)]
        batch_steps: usize,
        /// Also split a decode step at 1, 4, 16 and 64 rows into linear layers,
        /// attention, rotary/norms/copies, output head, sampling and grammar masks.
        #[arg(long)]
        profile: bool,
    },
    /// Perplexity of a text, chunked as llama.cpp's llama-perplexity does, for each
    /// weights mode.
    Perplexity {
        /// The text file.
        file: PathBuf,
        /// Tokens per chunk (the second half of each is scored).
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Weights modes to score (default: the global --weights).
        #[arg(long, value_parser = super::named::<WeightsMode>(super::WEIGHTS), value_delimiter = ',')]
        modes: Vec<WeightsMode>,
        /// Most chunks (0: all).
        #[arg(long, default_value_t = 0)]
        max_chunks: usize,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Grammar mask time per kind, and constrained against unconstrained throughput.
    Grammar {
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Concurrent generations through the model actor, batched and unbatched.
    Engine {
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Concurrency levels.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16, 64])]
        concurrency: Vec<usize>,
        /// Workload: `default` (128-token prompts, 64 new tokens) or `decode-heavy`
        /// (32-token prompts, 256 new tokens).
        #[arg(long, default_value = "default", value_parser = ["default", "decode-heavy"])]
        shape: String,
    },
}

/// Runs one bench on the model at `path`.
pub fn run(
    command: &BenchCommand,
    path: &Path,
    weights: WeightsMode,
    kv_dtype: KvDtype,
) -> anyhow::Result<()> {
    match command {
        BenchCommand::Grammar { json } => {
            let path = path.to_path_buf();
            let rt = super::runtime()?;
            let r = rt.block_on(troupe::bench::grammar::run(&path, weights, |line| {
                eprintln!("{line}")
            }))?;
            println!("model        {}", r.model);
            println!("kind         mask p50 µs   mask p99 µs   masks");
            for (k, q) in &r.mask_us {
                println!(
                    "{k:<12} {:>11.0} {:>13.0} {:>7}",
                    q.p50, q.p99, r.masks_measured[k]
                );
            }
            println!(
            "16 concurrent: JSON-Schema-constrained {:.1} tok/s, unconstrained {:.1} tok/s ({:.2}x)",
            r.constrained_tok_s,
            r.unconstrained_tok_s,
            r.constrained_tok_s / r.unconstrained_tok_s
        );
            if let Some(j) = json {
                super::write_json(j, &r)?;
            }
        }
        BenchCommand::Engine {
            json,
            concurrency,
            shape,
        } => {
            let path = path.to_path_buf();
            let base = if shape == "decode-heavy" {
                EngineBench::decode_heavy()
            } else {
                EngineBench::default()
            };
            let bench = EngineBench {
                concurrency: concurrency.clone(),
                kv_dtype,
                ..base
            };
            let rt = super::runtime()?;
            let report = rt.block_on(bench.run(&path, weights, |line| eprintln!("{line}")))?;
            print_engine(&report);
            if let Some(j) = json {
                super::write_json(j, &report)?;
            }
        }
        BenchCommand::Forward {
            json,
            batch_sizes,
            batch_steps,
            profile,
        } => {
            let path = path.to_path_buf();
            let bench = ForwardBench {
                batch_sizes: batch_sizes.clone(),
                batch_steps: *batch_steps,
                kv_dtype,
                profile_rows: if *profile {
                    vec![1, 4, 16, 64]
                } else {
                    Vec::new()
                },
                ..Default::default()
            };
            let report = bench.run(&path, weights, |line| eprintln!("{line}"))?;
            print_forward(&report);
            if let Some(j) = json {
                super::write_json(j, &report)?;
            }
        }
        BenchCommand::Perplexity {
            file,
            ctx,
            modes,
            max_chunks,
            json,
        } => {
            let path = path.to_path_buf();
            let bench = troupe::bench::perplexity::PerplexityBench {
                ctx: *ctx,
                max_chunks: *max_chunks,
                modes: if modes.is_empty() {
                    vec![weights]
                } else {
                    modes.clone()
                },
                kv_dtype,
            };
            let r = bench.run(&path, file, |line| eprintln!("{line}"))?;
            println!("model   {}", r.model);
            println!(
                "text    {} ({} chunks of {} tokens)",
                r.text, r.chunks, r.ctx
            );
            let base = r.runs.first().map_or(1.0, |x| x.perplexity);
            println!("mode     perplexity   vs first   tok/s    weights");
            for x in &r.runs {
                println!(
                    "{:<8} {:>10.4} {:>+9.3}% {:>7.1}    {}",
                    x.weights.to_string(),
                    x.perplexity,
                    (x.perplexity / base - 1.0) * 100.0,
                    x.tok_s,
                    x.weights_chosen
                );
            }
            if let Some(j) = json {
                super::write_json(j, &r)?;
            }
        }
    }
    Ok(())
}

fn print_engine(r: &troupe::bench::engine::EngineReport) {
    println!("model     {}", r.model);
    println!("weights   {}", r.weights);
    println!(
        "workload  {} prompt tokens, {} new tokens per request",
        r.prompt_tokens, r.new_tokens
    );
    println!(
        "decode, one sequence: direct forward {:.1} tok/s, through the actor {:.1} tok/s (overhead {:+.1}%)",
        r.direct_decode_tok_s,
        r.actor_decode_tok_s,
        (r.direct_decode_tok_s / r.actor_decode_tok_s - 1.0) * 100.0
    );
    println!("   N |  batched tok/s  ttft p50/p95 ms  itl p50/p95 ms | unbatched tok/s  ttft p50/p95 ms  itl p50/p95 ms | speed-up");
    for (n, b) in &r.by_concurrency {
        let u = &r.unbatched_by_concurrency[n];
        println!(
            "{n:>4} | {:>14.1} {:>8.0}/{:<8.0} {:>6.1}/{:<6.1} | {:>15.1} {:>8.0}/{:<8.0} {:>6.1}/{:<6.1} | {:>5.2}x",
            b.tok_s, b.ttft_ms_p50, b.ttft_ms_p95, b.itl_ms_p50, b.itl_ms_p95,
            u.tok_s, u.ttft_ms_p50, u.ttft_ms_p95, u.itl_ms_p50, u.itl_ms_p95,
            b.tok_s / u.tok_s
        );
    }
}

fn print_forward(r: &troupe::bench::forward::ForwardReport) {
    println!("model              {}", r.model);
    println!("weights            {}", r.weights);
    println!("threads            {}", r.threads);
    println!("prefill (512)      {:>8.1} tok/s", r.prefill_tok_s);
    println!(
        "decode (1 seq)     {:>8.1} tok/s   reference {:.1} tok/s  ({:.2}x)",
        r.decode_tok_s,
        r.reference_decode_tok_s,
        r.decode_tok_s / r.reference_decode_tok_s
    );
    println!(
        "f32 GEMM           {:>8.1} GFLOP/s, {} FLOP/token -> ceiling {:.1} tok/s",
        r.gemm_gflops, r.flops_per_token, r.compute_ceiling_tok_s
    );
    println!(
        "prefill / ceiling  {:>8.2}",
        r.prefill_tok_s / r.compute_ceiling_tok_s
    );
    println!("kv cache           {}", r.kv_dtype);
    let single = r
        .batched_decode_tok_s
        .get(&1)
        .copied()
        .unwrap_or(r.decode_tok_s);
    println!("batch   tok/s     / ceiling  / 1 row");
    for (b, t) in &r.batched_decode_tok_s {
        println!(
            "{b:>5} {t:>8.1}   {:>8.2}  {:>7.2}x",
            t / r.compute_ceiling_tok_s,
            t / single
        );
    }
    if !r.profile.is_empty() {
        println!("profile, ms per decode step (256-token caches; the last row: one prefill):");
        println!(" rows    step  linear    attn   other    head  sample   masks  fwd tok/s");
        for p in &r.profile {
            println!(
                "{:>5} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>10.1}",
                p.rows,
                p.step_ms,
                p.linear_ms,
                p.attention_ms,
                p.other_ms,
                p.head_ms,
                p.sampling_ms,
                p.masks_ms,
                p.forward_tok_s
            );
        }
    }
}
