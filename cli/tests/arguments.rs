//! The command line's argument parsing, through the built binary: every command is
//! listed, and each name of a library enum the CLI maps (weights modes, KV element
//! types, load-test grammars) is accepted where an unknown one is refused by name.
//! (This package's tests also make `cargo test --workspace` build the binary that the
//! library's CLI tests run.)

use std::process::Command;

fn troupe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(args)
        .env_remove("TROUPE_MODEL")
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_command() {
    let out = troupe(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "model", "tokenize", "generate", "chat", "run", "workflow", "loadtest", "bench",
    ] {
        assert!(help.contains(cmd), "`{cmd}` missing from:\n{help}");
    }
}

#[test]
fn enum_options_take_the_library_names_and_refuse_others() {
    for w in ["auto", "native", "f32", "q8_0", "bf16", "exact"] {
        let out = troupe(&["--weights", w, "model", "path"]);
        assert!(
            out.status.success(),
            "--weights {w}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for k in ["f16", "f32"] {
        let out = troupe(&["--kv-dtype", k, "model", "path"]);
        assert!(out.status.success(), "--kv-dtype {k}");
    }
    let out = troupe(&["--weights", "q4", "model", "path"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("q4") && err.contains("q8_0"), "{err}");
    let out = troupe(&["loadtest", "--grammar", "xml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("regex"));
}
