//! Ready-made tool-using agents for troupe. Each is a configuration (system prompt,
//! tools, tool choice, grammar) plus its tools, in its own module:
//!
//! | agent | what it does | example task |
//! |---|---|---|
//! | `calculator` | arithmetic with a required `calculate` call | "What is 17 * 23?" |
//! | `files` | lists, reads and searches files under a root | "Which file mentions Lisbon?" |
//! | `clock` | current date and time, unit conversions | "Convert 26.2 miles to kilometres." |
//! | `notes` | a key-value memory in a JSON file | "Remember that the door code is 1234." |
//! | `researcher` | answers from a folder of documents, citing files | "When is the launch?" |
//!
//! [`ReadyMade::build`] makes one by name; [`ReadyMade::spawn`] starts it on a model
//! actor. `troupe run NAME "TASK"` runs one from the command line.
//!
//! The source of this crate is also compiled into the `troupe` binary (a package
//! cannot depend on a crate that depends on it), so it refers to itself only through
//! relative paths.

#![warn(missing_docs)]

pub mod calculator;
pub mod clock;
pub mod files;
pub mod notes;
pub mod researcher;
#[cfg(test)]
mod testing;

use std::path::PathBuf;
use std::sync::Arc;

use kameo::actor::ActorRef;
use troupe::agent::{AgentActor, AgentConfig, Tool};
use troupe::engine::Engine;

/// One ready-made agent, as `troupe agents` lists it.
#[derive(Clone, Copy, Debug)]
pub struct AgentInfo {
    /// Its name.
    pub name: &'static str,
    /// What it does.
    pub description: &'static str,
    /// A task to try.
    pub example: &'static str,
    /// Whether it works on a folder (`--root`).
    pub uses_root: bool,
}

/// The ready-made agents.
pub const CATALOG: &[AgentInfo] = &[
    AgentInfo {
        name: "calculator",
        description: "Arithmetic: always computes with the calculate tool before answering.",
        example: "What is 17 * 23?",
        uses_root: false,
    },
    AgentInfo {
        name: "files",
        description: "Lists, reads and searches text files under --root (never outside it).",
        example: "Which file mentions Lisbon?",
        uses_root: true,
    },
    AgentInfo {
        name: "clock",
        description: "Tells the current date and time (UTC) and converts units.",
        example: "Convert 26.2 miles to kilometres.",
        uses_root: false,
    },
    AgentInfo {
        name: "notes",
        description: "Remembers and recalls key-value notes kept in a JSON file (--notes).",
        example: "Remember that the door code is 1234.",
        uses_root: false,
    },
    AgentInfo {
        name: "researcher",
        description: "Answers a question from the documents under --root, citing the files.",
        example: "When is the launch?",
        uses_root: true,
    },
];

/// Where the ready-made agents find their data.
#[derive(Clone, Debug)]
pub struct Options {
    /// The folder the files and researcher agents work on (default: the current one).
    pub root: PathBuf,
    /// The notes agent's JSON file (default: `notes.json` in the troupe home).
    pub notes: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            root: PathBuf::from("."),
            notes: troupe::model::fetch::troupe_home().join("notes.json"),
        }
    }
}

/// A ready-made agent's configuration and tools, ready to spawn (or to change first).
pub struct ReadyMade {
    /// The configuration.
    pub config: AgentConfig,
    /// Its tools.
    pub tools: Vec<Arc<dyn Tool>>,
}

impl ReadyMade {
    /// Builds the agent called `name`; an unknown name lists the known ones.
    pub fn build(name: &str, opts: &Options) -> anyhow::Result<Self> {
        let (config, tools) = match name {
            "calculator" => (calculator::config(), calculator::tools()),
            "files" => (
                files::config(),
                files::tools(&files::Root::new(&opts.root)?),
            ),
            "clock" => (clock::config(), clock::tools()),
            "notes" => (
                notes::config(),
                notes::tools(&notes::NoteStore::open(&opts.notes)?),
            ),
            "researcher" => {
                let root = files::Root::new(&opts.root)?;
                (researcher::config(&root), files::tools(&root))
            }
            _ => anyhow::bail!(
                "no ready-made agent `{name}` (agents: {})",
                CATALOG
                    .iter()
                    .map(|a| a.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        Ok(Self { config, tools })
    }

    /// Spawns it on `engine`.
    pub fn spawn(self, engine: &Engine) -> anyhow::Result<ActorRef<AgentActor>> {
        Ok(engine.agent(self.config, self.tools)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalog_entry_builds_with_its_tools() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.md"), "x").unwrap();
        let opts = Options {
            root: dir.path().into(),
            notes: dir.path().join("n.json"),
        };
        for info in CATALOG {
            let r = ReadyMade::build(info.name, &opts).unwrap();
            assert_eq!(r.config.name, info.name);
            let names: Vec<&str> = r.tools.iter().map(|t| t.name()).collect();
            assert_eq!(names, r.config.tools, "{}", info.name);
            for t in &r.tools {
                assert_eq!(t.parameters()["type"], "object", "{}", t.name());
            }
        }
        let e = ReadyMade::build("poet", &opts).err().unwrap().to_string();
        assert!(e.contains("no ready-made agent `poet`") && e.contains("calculator"));
        let missing = Options {
            root: dir.path().join("nope"),
            ..opts
        };
        assert!(ReadyMade::build("files", &missing).is_err_and(|e| e.to_string().contains("nope")));
    }

    /// Every agent's grammars (tool calls, the calculator's answers, the researcher's
    /// citations over escaped file names) compile: `AgentActor::new` compiles them all.
    /// And each accepts the agent's own demonstrated exchange: every few-shot reply,
    /// under the tool choice the turn has at that step (the configured one first, `auto`
    /// after a forced call, `none` once the step limit is reached), is a complete output
    /// of that step's grammar, and the first step's grammar refuses the final answer
    /// when a call is required.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_agent_spawns_with_its_grammars_compiled() {
        use troupe::agent::{reply_grammar, ToolChoice};
        use troupe::Role;
        let dir = tempfile::tempdir().unwrap();
        let model = testing::tiny_model();
        let engine = Engine::serve(model.clone(), Default::default()).unwrap();
        let docs = dir.path().join("docs");
        std::fs::create_dir_all(docs.join("house")).unwrap();
        // Names that need escaping, and the files the researcher's examples cite.
        for name in [
            "a+b (1).md",
            "c[2].txt",
            "plain.txt",
            "pets.md",
            "house/bills.txt",
        ] {
            std::fs::write(docs.join(name), "text").unwrap();
        }
        let opts = Options {
            root: docs,
            notes: dir.path().join("n.json"),
        };
        for info in CATALOG {
            let made = ReadyMade::build(info.name, &opts).unwrap();
            let cfg = made.config.clone();
            let grammar = |choice: &ToolChoice| {
                reply_grammar(
                    &made.tools,
                    choice,
                    cfg.grammar.as_ref(),
                    troupe::agent::CallFormat::Troupe,
                )
                .unwrap()
                .unwrap_or_else(|| panic!("{}: a tool agent's replies are constrained", info.name))
            };
            let mut replies = 0;
            let (mut choice, mut steps) = (cfg.tool_choice.clone(), 0);
            for m in &cfg.examples {
                match m.role {
                    Role::User => (choice, steps) = (cfg.tool_choice.clone(), 0),
                    Role::Tool => {
                        steps += 1;
                        choice = if steps >= cfg.max_tool_steps {
                            ToolChoice::None
                        } else {
                            ToolChoice::Auto
                        };
                    }
                    Role::Assistant => {
                        replies += 1;
                        assert!(
                            testing::accepts(&grammar(&choice), &m.content),
                            "{}: under {choice:?} the grammar refuses its example {:?}",
                            info.name,
                            m.content
                        );
                        let forced =
                            matches!(cfg.tool_choice, ToolChoice::Required | ToolChoice::Tool(_));
                        if forced && troupe::agent::parse_call(&m.content).is_none() {
                            assert!(
                                !testing::accepts(&grammar(&cfg.tool_choice), &m.content),
                                "{}: the first step must call a tool, not answer {:?}",
                                info.name,
                                m.content
                            );
                        }
                    }
                    Role::System => {}
                }
            }
            assert!(
                replies >= 2,
                "{}: demonstrates a call and an answer",
                info.name
            );
            if let Err(e) = made.spawn(&engine) {
                panic!("{}: {e}", info.name);
            }
        }
    }
}
