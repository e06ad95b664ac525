//! `troupe serve` driven by real clients: the official `openai` Python package and
//! the OpenAI Agents SDK, on the default model (tests/python/*.py hold the checks).

mod common;

use common::serve::{run_python, ServeProcess};

#[test]
fn the_openai_client_gets_completions_tools_schemas_and_errors() {
    let Some(py) = common::python() else { return };
    let server = ServeProcess::start(&common::real_model_path(), &[]);
    run_python(
        &py,
        "openai_client.py",
        &[
            ("TROUPE_URL", &server.url),
            ("TROUPE_MODEL_ID", &server.model_id),
        ],
    );
}

#[test]
fn ten_sessions_reuse_their_caches_and_a_dropped_stream_frees_its_slot() {
    let Some(py) = common::python() else { return };
    let server = ServeProcess::start(&common::real_model_path(), &[]);
    run_python(
        &py,
        "sessions.py",
        &[
            ("TROUPE_URL", &server.url),
            ("TROUPE_MODEL_ID", &server.model_id),
        ],
    );
}

#[test]
fn the_agents_sdk_runs_a_tool_agent_to_a_final_answer() {
    let Some(py) = common::python() else { return };
    let server = ServeProcess::start(&common::real_model_path(), &[]);
    run_python(
        &py,
        "agents_sdk.py",
        &[
            ("TROUPE_URL", &server.url),
            ("TROUPE_MODEL_ID", &server.model_id),
        ],
    );
}

#[test]
fn a_wrong_key_gets_401_and_a_request_past_the_in_flight_limit_503() {
    let Some(py) = common::python() else { return };
    let args = ["--api-key", "secret", "--max-in-flight", "1"];
    let server = ServeProcess::start(&common::tiny_model_path(), &args);
    run_python(
        &py,
        "limits.py",
        &[
            ("TROUPE_URL", &server.url),
            ("TROUPE_MODEL_ID", &server.model_id),
        ],
    );
}
