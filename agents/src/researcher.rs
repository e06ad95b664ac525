//! The researcher agent: answers a question from a local folder of documents with the
//! files tools, and cites the files it used. Its final answer is constrained to start
//! with a `Sources:` line naming one to three files that exist under the root (a
//! regex over the folder's file names, built when the agent is built), or `none` when
//! nothing was found, then the answer itself: every answer cites, and cites only real
//! files. Files added later cannot be cited; past [`MAX_CITABLE`] files any name is
//! allowed (the regex would grow too large).
//!
//! Example task: "When is the launch?" with `--root ./docs`.

use troupe::agent::{example_exchange, AgentConfig, ToolChoice};
use troupe::grammar::Grammar;

use super::files::Root;

/// Most file names the citation grammar enumerates; beyond this any name is allowed.
pub const MAX_CITABLE: usize = 200;

/// The researcher's configuration for the documents under `root` (its tools are
/// [`super::files::tools`] on the same root).
pub fn config(root: &Root) -> AgentConfig {
    AgentConfig {
        tools: super::files::config().tools,
        tool_choice: ToolChoice::Required,
        max_tool_steps: 1,
        max_tokens: 160,
        grammar: Some(Grammar::Regex(citation_regex(root))),
        examples: [
            example_exchange(
                "Where do the cats sleep?",
                "search_files",
                serde_json::json!({"query": "cats sleep"}),
                "pets.md:3: The cats sleep in the barn.",
                "Sources: pets.md\nThe cats sleep in the barn.",
            ),
            example_exchange(
                "How much did the new roof cost?",
                "search_files",
                serde_json::json!({"query": "roof cost"}),
                "house/bills.txt:7: The new roof cost 9,000 dollars.",
                "Sources: house/bills.txt\nThe new roof cost 9,000 dollars.",
            ),
        ]
        .concat(),
        ..AgentConfig::new(
            "researcher",
            "You answer questions from the documents in a folder. First call search_files with the main words of the question. Then answer with a line `Sources:` naming the files you used, then one sentence taken from them.",
        )
    }
}

/// `Sources: a, b` over the files under `root`, then a line of answer.
pub fn citation_regex(root: &Root) -> String {
    let names: Vec<String> = root
        .file_names()
        .iter()
        .filter(|n| !n.contains('\n'))
        .map(|n| escape(n))
        .collect();
    let file = if names.is_empty() || names.len() > MAX_CITABLE {
        "[^\\n<,]+".to_string()
    } else {
        format!("({}|none)", names.join("|"))
    };
    format!("Sources: {file}(, {file}){{0,2}}\\n[^<\\n]{{1,300}}")
}

/// Escapes regex metacharacters in a file name (`/` is left to the tools grammar,
/// which escapes it for Lark).
fn escape(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::testing::accepts;
    use super::*;
    use troupe::agent::reply_grammar;

    /// The grammar of the researcher's final answer as its turn compiles it: after its
    /// one tool step the choice is `none`, and the citation regex sits inside a Lark
    /// rule (with `/` escaped), compiled by llguidance.
    fn answer_grammar(root: &Root) -> Grammar {
        let cfg = config(root);
        let tools = super::super::files::tools(root);
        reply_grammar(
            &tools,
            &ToolChoice::None,
            cfg.grammar.as_ref(),
            troupe::agent::CallFormat::Troupe,
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn citations_name_only_files_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("a+b.md"), "x").unwrap();
        std::fs::write(dir.path().join("d/c.txt"), "y").unwrap();
        let root = Root::new(dir.path()).unwrap();
        let g = answer_grammar(&root);
        assert!(
            matches!(&g, Grammar::Lark(l) if l.contains("d\\/c\\.txt")),
            "{g:?}"
        );
        assert!(accepts(&g, "Sources: a+b.md\nThe answer."));
        assert!(
            accepts(&g, "Sources: d/c.txt, a+b.md\nIt is so."),
            "a `/` in a name"
        );
        assert!(!accepts(&g, "Sources: other.md\nNo."));
        assert!(!accepts(&g, "Sources: d/c.txt, other.md\nNo."));
        assert!(!accepts(&g, "The answer without sources."));
        assert!(accepts(&g, "Sources: none\nThe files do not say."));
        assert!(!accepts(&g, "Sources: ab.md\nNo."), "`+` is literal");
        assert!(!accepts(&g, "Sources: a+b.md\n"), "an answer follows");
        assert!(
            !accepts(&g, "Sources: a+b.md, a+b.md, a+b.md, a+b.md\nNo."),
            "at most three"
        );
        // Every file is citable, past the listing tool's 50 lines.
        for i in 0..60 {
            std::fs::write(dir.path().join(format!("f{i:02}.txt")), "z").unwrap();
        }
        let g = answer_grammar(&root);
        assert!(accepts(&g, "Sources: f59.txt\nYes."));
        assert!(!accepts(&g, "Sources: f60.txt\nNo."));
        // The first step must search: a citation there is refused.
        let cfg = config(&root);
        let tools = super::super::files::tools(&root);
        let first = reply_grammar(
            &tools,
            &cfg.tool_choice,
            cfg.grammar.as_ref(),
            troupe::agent::CallFormat::Troupe,
        )
        .unwrap()
        .unwrap();
        assert!(!accepts(&first, "Sources: f59.txt\nYes."));
        assert!(accepts(
            &first,
            &troupe::agent::format_call("search_files", &serde_json::json!({"query": "launch"}))
        ));
        let names: Vec<String> = tools.iter().map(|t| t.name().to_string()).collect();
        assert_eq!(cfg.tools, names);
    }

    #[test]
    fn past_the_limit_any_name_is_citable() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..=MAX_CITABLE {
            std::fs::write(dir.path().join(format!("f{i:03}.txt")), "z").unwrap();
        }
        let g = answer_grammar(&Root::new(dir.path()).unwrap());
        assert!(accepts(&g, "Sources: anything.md\nYes."));
        assert!(!accepts(&g, "No sources line."));
    }
}
