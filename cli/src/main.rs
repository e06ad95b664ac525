//! The `troupe` command line: model management, tokenizer and generation helpers,
//! and benchmarks.

mod cli;
use troupe_agents as ready_made;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use troupe::model::fetch::{self, FetchOutcome};
use troupe::model::{LoadOptions, Model, WeightsMode};
use troupe::KvDtype;

/// troupe: a Rust runtime for LLM agents built on actors.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// GGUF model file, or a catalogue name (`troupe model list`; default: the
    /// fetched SmolLM2-135M-Instruct).
    #[arg(long, global = true, env = "TROUPE_MODEL")]
    model: Option<PathBuf>,
    /// How weights are stored and multiplied.
    #[arg(long, global = true, value_parser = cli::named::<WeightsMode>(cli::WEIGHTS), default_value = "auto")]
    weights: WeightsMode,
    /// Element type of the KV caches (default: the engine's, f32 or f16).
    #[arg(long, global = true, value_parser = cli::named::<KvDtype>(cli::KV_DTYPES))]
    kv_dtype: Option<KvDtype>,
    /// Spill evicted KV caches to files in DIR and read them back on the agent's next
    /// turn, instead of recomputing them (chat, run, loadtest, serve).
    #[arg(long, global = true, value_name = "DIR")]
    spill: Option<PathBuf>,
    /// Print a backtrace with an error (as does TROUPE_BACKTRACE=1).
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Log lines on stderr (their level from RUST_LOG, default warn) as text or JSON.
    #[arg(long, global = true, value_enum, default_value_t = cli::trace::LogFormat::Text)]
    log_format: cli::trace::LogFormat,
    /// Write a Chrome/Perfetto trace of the run here (one track per agent, one for
    /// the engine's steps); open it in chrome://tracing or ui.perfetto.dev.
    #[arg(long, global = true)]
    trace: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch, locate and describe models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Print the token ids of TEXT as a JSON array (with --decode: TEXT is a JSON
    /// array of ids, printed back as text).
    Tokenize {
        /// Text to tokenize, or a JSON array of ids with --decode.
        text: String,
        /// Decode ids instead of encoding text.
        #[arg(long)]
        decode: bool,
    },
    /// Generate a reply to a prompt.
    Generate {
        /// The user message (or the raw prompt with --raw).
        #[arg(long)]
        prompt: String,
        /// A system message.
        #[arg(long)]
        system: Option<String>,
        /// Feed the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Constrain the output to JSON valid against the schema in FILE. Keywords the
        /// grammar cannot enforce while decoding (`uniqueItems`, `not`, ...) are
        /// checked on the finished output instead; a violation is an error.
        #[arg(long, value_name = "FILE", group = "grammar")]
        json_schema: Option<PathBuf>,
        /// Refuse a --json-schema with keywords the grammar cannot enforce, naming
        /// them, instead of checking them afterwards.
        #[arg(long, requires = "json_schema")]
        strict_schema: bool,
        /// Constrain the output to match this regular expression.
        #[arg(long, value_name = "REGEX", group = "grammar")]
        regex: Option<String>,
        /// Constrain the output to the Lark grammar in FILE.
        #[arg(long, value_name = "FILE", group = "grammar")]
        lark: Option<PathBuf>,
        /// Constrain the output to one of these comma-separated choices.
        #[arg(long, value_name = "A,B,C", value_delimiter = ',', group = "grammar")]
        choice: Option<Vec<String>>,
    },
    /// Multi-turn chat with one agent (streams in a terminal; with piped stdin, one
    /// message per line, each reply followed by a `usage:` line).
    Chat {
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        /// Agent config file (.toml or .json).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Most tokens per reply.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Sampling temperature (0: greedy).
        #[arg(long)]
        temperature: Option<f32>,
        /// Sampling seed.
        #[arg(long)]
        seed: Option<u64>,
        /// An MCP server whose tools the agent gets: `NAME=COMMAND ARGS...` (stdio)
        /// or `NAME=URL` (streamable HTTP); repeatable.
        #[arg(long, value_name = "NAME=COMMAND ARGS...")]
        mcp: Vec<String>,
    },
    /// Load-test agent concurrency: N agents in multi-turn conversations (closed or
    /// open loop), in process or over HTTP against an OpenAI-compatible server (--url).
    Loadtest(cli::loadtest::LoadtestArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
    /// Run a ready-made agent on a task (more tasks: more turns of one conversation),
    /// printing each tool call, its result and time, the answer and the token usage.
    Run {
        /// The agent (see `troupe agents`).
        agent: String,
        /// The task(s).
        #[arg(required = true)]
        tasks: Vec<String>,
        /// Folder the files and researcher agents work on.
        #[arg(long, default_value = ".")]
        root: PathBuf,
        /// JSON file of the notes agent (default: notes.json in the troupe home).
        #[arg(long)]
        notes: Option<PathBuf>,
        /// Most tokens per model reply (default: the agent's own).
        #[arg(long)]
        max_tokens: Option<usize>,
        /// An MCP server whose tools the agent gets too: `NAME=COMMAND ARGS...`
        /// (stdio) or `NAME=URL` (streamable HTTP); repeatable.
        #[arg(long, value_name = "NAME=COMMAND ARGS...")]
        mcp: Vec<String>,
    },
    /// Serve the model over the OpenAI API (chat completions, streaming, tools,
    /// JSON Schema), each conversation a session whose agent keeps its KV cache.
    Serve(cli::serve::ServeArgs),
    /// List the ready-made agents.
    Agents,
    /// Model Context Protocol: list a server's tools, or offer troupe's agents as
    /// MCP tools.
    #[command(subcommand)]
    Mcp(McpCommand),
    /// Run a bundled demo workflow: pipeline, fan-out, router or group-chat (`list`
    /// lists them).
    Workflow {
        /// The workflow.
        name: String,
        /// Input instead of the demo's own.
        #[arg(long)]
        input: Option<String>,
        /// Most tokens per agent reply.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
    },
}

#[derive(Subcommand)]
enum McpCommand {
    /// List an MCP server's tools with their compact signatures (what an agent's
    /// model sees): SERVER is `COMMAND ARGS...` (one argument, quoted) or a URL.
    Tools {
        /// The server: `'COMMAND ARGS...'` or `http://HOST:PORT/mcp`.
        server: String,
    },
    /// Offer agents as MCP tools (`ask_<agent>` with a `task` string) on stdio, or
    /// on streamable HTTP with --http.
    Serve {
        /// A ready-made agent's name or an agent config file (.toml/.json);
        /// repeatable (default: every ready-made agent).
        #[arg(long)]
        agent: Vec<String>,
        /// Serve streamable HTTP at http://127.0.0.1:PORT/mcp (0: a free port, printed
        /// on stderr) instead of stdio.
        #[arg(long, value_name = "PORT")]
        http: Option<u16>,
        /// Folder the files and researcher agents work on.
        #[arg(long, default_value = ".")]
        root: PathBuf,
        /// JSON file of the notes agent (default: notes.json in the troupe home).
        #[arg(long)]
        notes: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download a catalogue model (default: SmolLM2-135M-Instruct, Q4_1) into the
    /// troupe home.
    Fetch {
        /// Its catalogue name (`troupe model list`).
        name: Option<String>,
    },
    /// The catalogue of models `fetch` and `--model NAME` know, and which are present.
    List,
    /// Print the resolved model file.
    Path,
    /// Describe the model: architecture, size, quantization, tokenizer, weights mode.
    Info {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command; an error is printed as its chain of causes on one line, with a
/// backtrace only when asked for (`-v` or `TROUPE_BACKTRACE=1`), whatever
/// `RUST_BACKTRACE` says.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let backtrace = cli.verbose || std::env::var_os("TROUPE_BACKTRACE").is_some_and(|v| v == "1");
    // anyhow captures a backtrace per error when RUST_LIB_BACKTRACE (or else
    // RUST_BACKTRACE) says so; set before any thread starts.
    std::env::set_var("RUST_LIB_BACKTRACE", if backtrace { "1" } else { "0" });
    let _trace = cli::trace::init(cli.log_format, cli.trace.clone());
    match run_command(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if backtrace {
                eprintln!("{}", e.backtrace());
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    let _ = cli::KV_DTYPE.set(cli.kv_dtype.unwrap_or_default());
    let _ = cli::SPILL.set(cli.spill.clone());
    let model_path =
        || -> anyhow::Result<PathBuf> { Ok(fetch::resolve_model_path(cli.model.as_deref())?) };
    let load = || -> anyhow::Result<Model> {
        let path = model_path()?;
        Model::load(
            &path,
            LoadOptions {
                weights: cli.weights,
            },
        )
        .with_context(|| format!("loading {}", path.display()))
    };
    match &cli.command {
        Command::Model(ModelCommand::List) => cli::info::print_catalogue(),
        Command::Model(ModelCommand::Fetch { name }) => match match name {
            Some(name) => troupe::model::catalogue::entry(name)?.fetch()?,
            None => fetch::fetch_default_model()?,
        } {
            FetchOutcome::AlreadyPresent(p) => println!("already present: {}", p.display()),
            FetchOutcome::Fetched(p) => println!("fetched: {}", p.display()),
        },
        Command::Model(ModelCommand::Path) => println!("{}", model_path()?.display()),
        Command::Model(ModelCommand::Info { json }) => {
            let model = load()?;
            let info = model.info();
            if *json {
                println!("{}", serde_json::to_string_pretty(info)?);
            } else {
                cli::info::print_info(info);
            }
        }
        Command::Tokenize { text, decode } => {
            let model = load()?;
            let tok = model.tokenizer();
            if *decode {
                let ids: Vec<u32> = serde_json::from_str(text)
                    .context("--decode expects a JSON array of token ids")?;
                println!("{}", tok.decode(&ids)?);
            } else {
                println!("{}", serde_json::to_string(&tok.encode(text)?)?);
            }
        }
        Command::Generate {
            prompt,
            system,
            raw,
            max_tokens,
            temperature,
            seed,
            json_schema,
            strict_schema,
            regex,
            lark,
            choice,
        } => cli::generate::run(
            &load()?,
            cli::generate::GenerateOptions {
                prompt,
                system: system.as_deref(),
                raw: *raw,
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: *seed,
                json_schema: json_schema.as_deref(),
                strict_schema: *strict_schema,
                regex: regex.as_deref(),
                lark: lark.as_deref(),
                choice: choice.as_deref(),
                kv_dtype: cli.kv_dtype.unwrap_or_default(),
            },
        )?,
        Command::Run {
            agent,
            tasks,
            root,
            notes,
            max_tokens,
            mcp,
        } => {
            let defaults = ready_made::Options::default();
            cli::run::run(cli::run::RunOptions {
                mcp: cli::mcp::parse_servers(mcp)?,
                model: cli.model.as_deref(),
                weights: cli.weights,
                agent,
                tasks,
                data: ready_made::Options {
                    root: root.clone(),
                    notes: notes.clone().unwrap_or(defaults.notes),
                },
                max_tokens: *max_tokens,
            })?;
        }
        Command::Agents => cli::run::list(),
        Command::Serve(a) => cli::serve::run(&model_path()?, cli.weights, a)?,
        Command::Mcp(McpCommand::Tools { server }) => {
            cli::mcp::tools(&model_path()?, cli.weights, server)?
        }
        Command::Mcp(McpCommand::Serve {
            agent,
            http,
            root,
            notes,
        }) => {
            let defaults = ready_made::Options::default();
            cli::mcp::serve(cli::mcp::ServeOptions {
                model: &model_path()?,
                weights: cli.weights,
                agents: agent,
                http: *http,
                data: ready_made::Options {
                    root: root.clone(),
                    notes: notes.clone().unwrap_or(defaults.notes),
                },
            })?;
        }
        Command::Workflow {
            name,
            input,
            max_tokens,
        } => {
            if name == "list" {
                for (n, what, input) in cli::workflow::DEMOS {
                    println!("{n:<11} {what}  (default input: {input:?})");
                }
            } else {
                cli::workflow::run(cli::workflow::WorkflowOptions {
                    model: cli.model.as_deref(),
                    weights: cli.weights,
                    name,
                    input: input.as_deref(),
                    max_tokens: *max_tokens,
                })?;
            }
        }
        Command::Chat {
            system,
            agent,
            max_tokens,
            temperature,
            seed,
            mcp,
        } => {
            let path = model_path()?;
            cli::chat::run(cli::chat::ChatOptions {
                mcp: cli::mcp::parse_servers(mcp)?,
                model: &path,
                weights: cli.weights,
                agent: agent.as_deref(),
                system: system.as_deref(),
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: *seed,
            })?;
        }
        Command::Bench(b) => cli::bench::run(
            b,
            &model_path()?,
            cli.weights,
            cli.kv_dtype.unwrap_or_default(),
        )?,
        Command::Loadtest(a) => {
            cli::loadtest::run(a, cli.model.as_deref(), cli.weights, cli.kv_dtype)?
        }
    }
    Ok(())
}
