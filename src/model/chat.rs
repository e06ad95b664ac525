//! Chat messages and chat-template rendering: this module owns the [`Message`] type
//! and turns a conversation into the prompt text a model expects, by rendering the
//! GGUF's own `tokenizer.chat_template` (a Hugging Face style Jinja template) with
//! minijinja, or ChatML when the file carries no template.
//!
//! The environment is set up the way Hugging Face transformers compiles chat templates
//! (`trim_blocks`, `lstrip_blocks`, loop controls, one trailing newline dropped), with
//! Python string methods (`.strip()`, `.startswith()`, …) and the `raise_exception` and
//! `strftime_now` globals that templates in the wild call, so a template renders here
//! exactly as it does there.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{context, Environment, ErrorKind, Value};

use crate::{Error, Result};

/// The name the template is registered under in its environment; error messages quote it.
const TEMPLATE_NAME: &str = "chat_template";

/// The ChatML template used when a model ships none.
const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person (or program) talking to the model.
    User,
    /// The model itself.
    Assistant,
    /// The result of a tool call, fed back to the model.
    Tool,
}

/// One turn of a conversation, as the chat template sees it (`message['role']`,
/// `message['content']`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
}

impl Message {
    /// A message with the given role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// A tool-result message.
    pub fn tool(content: impl Into<String>) -> Self {
        Self::new(Role::Tool, content)
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    /// Holds the compiled template (registered as [`TEMPLATE_NAME`]) and its globals.
    env: Environment<'static>,
    /// The template text, kept for [`ChatTemplate::source`].
    source: String,
    /// Passed to the template as `bos_token`.
    bos_token: String,
    /// Passed to the template as `eos_token`.
    eos_token: String,
    /// Whether it renders tools and teaches `<tool_call>` calls (probed once).
    teaches_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compile a template; a syntax error -> [`Error::ChatTemplate`] naming the problem.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face compiles with ImmutableSandboxedEnvironment(trim_blocks=True,
        // lstrip_blocks=True) and Jinja's default of dropping one trailing newline;
        // templates are written against those rules.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template from a file must end: each render gets this many instructions.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| template_error("does not compile", &e))?;
        let mut template = Self {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            teaches_tools: false,
        };
        template.teaches_tools = template.probe_tool_calls();
        Ok(template)
    }

    /// The ChatML fallback: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, and
    /// `<|im_start|>assistant\n` as generation prompt.
    pub fn chatml() -> Self {
        // A constant template; the `chatml_*` tests compile and render it.
        #[allow(clippy::expect_used)]
        Self::new(CHATML_TEMPLATE, "", "<|im_end|>").expect("the built-in ChatML template compiles")
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders a `tools` list into the prompt and teaches calls
    /// in `<tool_call>` tags (Qwen's and other Hermes-style templates): rendered once
    /// with a probe tool, whose name must appear, beside a `<tool_call>` tag.
    pub fn teaches_tool_calls(&self) -> bool {
        self.teaches_tools
    }

    /// The probe behind [`teaches_tool_calls`](Self::teaches_tool_calls).
    fn probe_tool_calls(&self) -> bool {
        const PROBE: &str = "troupe_probe_tool";
        let tools = serde_json::json!([{
            "type": "function",
            "function": {"name": PROBE, "description": "", "parameters": {"type": "object", "properties": {}}},
        }]);
        self.render_with_tools(&[Message::user("hi")], Some(&tools), true)
            .is_ok_and(|text| text.contains(PROBE) && text.contains("<tool_call>"))
    }

    /// Render; a template that fails to render (`raise_exception`, an attribute of an
    /// undefined value, …) -> [`Error::ChatTemplate`] with minijinja's message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`render`](Self::render) with the template's `tools` variable set to `tools`
    /// (OpenAI-style function descriptions), for templates that teach tool calls.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error("is missing", &e))?;
        let mut out = BoundedOutput::default();
        let rendered = template.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                tools => tools.map(Value::from_serialize),
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|e| Error::ChatTemplate(format!("template rendered invalid UTF-8: {e}"))),
            Err(_) if out.overflowed => Err(Error::TemplateLimit {
                limit: format!("output bound of {TEMPLATE_OUTPUT_BYTES} bytes"),
            }),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::TemplateLimit {
                limit: format!("fuel of {TEMPLATE_FUEL} instructions"),
            }),
            Err(e) => Err(template_error("failed to render", &e)),
        }
    }
}

/// Instructions one render may run (a conversation of thousands of messages takes a
/// small fraction of it; a template that loops forever runs out).
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// Longest rendered prompt, in bytes.
pub const TEMPLATE_OUTPUT_BYTES: usize = 16 << 20;

/// A render's output, refusing to grow past [`TEMPLATE_OUTPUT_BYTES`].
#[derive(Default)]
struct BoundedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > TEMPLATE_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output bound"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An [`Error::ChatTemplate`] carrying minijinja's message and the causes behind it.
fn template_error(what: &str, err: &minijinja::Error) -> Error {
    let mut message = format!("template {what}: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Error::ChatTemplate(message)
}

/// `raise_exception(msg)`: templates call it to reject a conversation they cannot
/// format (say, roles that do not alternate); rendering fails with `msg`.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// `strftime_now(format)`: the current UTC time formatted with strftime codes (as
/// chrono knows them); Llama 3 style templates use it to put today's date into the
/// system prompt.
fn strftime_now(format: &str) -> std::result::Result<String, minijinja::Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?
        .as_secs();
    strftime(format, secs)
}

/// Format `secs` since the Unix epoch (UTC) with chrono's strftime; a format chrono
/// does not know is an error for the template, never a panic.
fn strftime(format: &str, secs: u64) -> std::result::Result<String, minijinja::Error> {
    use std::fmt::Write;
    let bad = |what: String| minijinja::Error::new(ErrorKind::InvalidOperation, what);
    let items = chrono::format::StrftimeItems::new(format)
        .parse()
        .map_err(|e| bad(format!("strftime_now: bad format {format:?}: {e}")))?;
    let time = i64::try_from(secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .ok_or_else(|| bad(format!("strftime_now: time {secs} out of range")))?;
    let mut out = String::with_capacity(format.len() + 16);
    write!(out, "{}", time.format_with_items(items.iter()))
        .map_err(|e| bad(format!("strftime_now: {e}")))?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`, as embedded in its GGUF.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}";

    fn smollm2() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap()
    }

    /// Renders `messages` with `template` and compares to `expected`.
    fn check(template: &ChatTemplate, messages: &[Message], generation: bool, expected: &str) {
        let rendered = template.render(messages, generation).unwrap();
        assert_eq!(
            rendered, expected,
            "rendered:\n{rendered}\nexpected:\n{expected}"
        );
    }

    /// Renders a one-off template against one user message `hi`.
    fn render_source(source: &str) -> Result<String> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(&[Message::user("hi")], false)
    }

    #[test]
    fn a_looping_or_huge_template_stops_with_a_named_error() {
        let looping =
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let e = render_source(looping).unwrap_err();
        assert!(matches!(e, Error::TemplateLimit { .. }), "{e}");
        assert!(e.to_string().contains("fuel"), "{e}");
        let huge = ChatTemplate::new(
            "{% for a in range(100) %}{{ messages[0].content }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let e = huge
            .render(&[Message::user("y".repeat(1 << 20))], false)
            .unwrap_err();
        assert!(e.to_string().contains("output bound"), "{e}");
    }

    #[test]
    fn smollm2_renders_a_full_conversation() {
        check(
            &smollm2(),
            &[
                Message::system("Be brief."),
                Message::user("Hi"),
                Message::assistant("Hello!"),
                Message::user("What is 2+2?"),
            ],
            true,
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n",
        );
    }

    #[test]
    fn smollm2_injects_its_default_system_prompt() {
        check(
            &smollm2(),
            &[Message::user("Hi")],
            false,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n",
        );
    }

    #[test]
    fn smollm2_with_a_trailing_newline_renders_the_same() {
        // Jinja drops one trailing newline of the source, as HF does.
        let with_newline = format!("{SMOLLM2_TEMPLATE}\n");
        let template = ChatTemplate::new(&with_newline, "", "").unwrap();
        let messages = [Message::user("Hi")];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            smollm2().render(&messages, true).unwrap()
        );
    }

    #[test]
    fn chatml_fallback_is_exact() {
        check(
            &ChatTemplate::chatml(),
            &[
                Message::system("S"),
                Message::user("U"),
                Message::assistant("A"),
            ],
            true,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n\
             <|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n",
        );
        check(
            &ChatTemplate::chatml(),
            &[Message::user("U")],
            false,
            "<|im_start|>user\nU<|im_end|>\n",
        );
        assert_eq!(ChatTemplate::chatml().source(), CHATML_TEMPLATE);
    }

    #[test]
    fn tools_reach_a_template_that_renders_them() {
        let hermes = ChatTemplate::new(
            "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> reply <tool_call>...</tool_call>\n{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(hermes.teaches_tool_calls());
        let tools = serde_json::json!([{"name": "f"}]);
        let text = hermes
            .render_with_tools(&[Message::user("hi")], Some(&tools), false)
            .unwrap();
        assert!(text.starts_with("<tools>{\"name\":"), "{text}");
        assert!(text.ends_with("hi"), "{text}");
        assert!(!ChatTemplate::chatml().teaches_tool_calls());
        assert!(!smollm2().teaches_tool_calls());
    }

    #[test]
    fn tool_role_renders() {
        check(
            &ChatTemplate::chatml(),
            &[Message::tool("{\"temp\": 21}")],
            false,
            "<|im_start|>tool\n{\"temp\": 21}<|im_end|>\n",
        );
    }

    #[test]
    fn special_tokens_reach_the_template() {
        assert_eq!(
            render_source("{{ bos_token }}{{ messages[0].content }}{{ eos_token }}").unwrap(),
            "<s>hi</s>"
        );
    }

    #[test]
    fn blocks_are_trimmed_and_lstripped_like_hf() {
        let source = "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(render_source(source).unwrap(), "[hi]\n");
    }

    #[test]
    fn syntax_error_fails_at_new() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::ChatTemplate(_)));
        assert!(message.contains("does not compile"), "{message}");
        assert!(message.contains("syntax error"), "{message}");
        assert!(message.contains("chat_template:1"), "{message}");
    }

    #[test]
    fn raise_exception_fails_render_with_its_message() {
        let err = render_source("{{ raise_exception('roles must alternate') }}").unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)));
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn attribute_of_undefined_fails_render() {
        let err = render_source("{{ nothing.here }}").unwrap_err();
        assert!(err.to_string().contains("failed to render"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let source = "{{ '  padded  '.strip() }}|{{ messages[0].content.startswith('h') }}|{{ 'a,b'.split(',') | join('+') }}";
        // Booleans print as Python does, like in Jinja2.
        assert_eq!(render_source(source).unwrap(), "padded|True|a+b");
    }

    #[test]
    fn loop_controls_work() {
        let source = "{% for i in [1, 2, 3, 4] %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}";
        assert_eq!(render_source(source).unwrap(), "13");
    }

    #[test]
    fn message_serde_uses_lowercase_roles() {
        let json = serde_json::to_string(&Message::assistant("ok")).unwrap();
        assert_eq!(json, r#"{"role":"assistant","content":"ok"}"#);
        let back: Message = serde_json::from_str(r#"{"role":"tool","content":"x"}"#).unwrap();
        assert_eq!(back, Message::tool("x"));
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let secs = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S", secs).unwrap(),
            "2024-02-29 13:05:09"
        );
        assert_eq!(strftime("%d %b %Y", secs).unwrap(), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %e, %y %I%p day %j %%", secs).unwrap(),
            "Thursday February 29, 24 01PM day 060 %"
        );
        assert_eq!(strftime("%a %d %b", 0).unwrap(), "Thu 01 Jan");
        assert!(strftime("%Q", 0).is_err());
    }

    #[test]
    fn strftime_now_is_callable_from_templates() {
        let year = render_source("{{ strftime_now('%Y') }}").unwrap();
        assert_eq!(year.len(), 4);
        assert!(year.starts_with("20"), "{year}");
    }
}
