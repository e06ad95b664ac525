//! The calculator agent: arithmetic through the `calculate` tool, which evaluates an
//! expression with the evalexpr crate inside tight limits (input size, nesting depth,
//! a fixed set of functions, no variables or assignments). The agent must call the
//! tool before it answers, so even a small model computes rather than guesses.
//!
//! Example task: "What is 17 * 23?" (the trace shows `calculate {"expression":"17 * 23"}`
//! returning `391`).

use std::sync::Arc;

use evalexpr::{
    Context, ContextWithMutableFunctions, ContextWithMutableVariables, DefaultNumericTypes, Value,
};

type Function = evalexpr::Function<DefaultNumericTypes>;
use troupe::agent::{example_exchange, tool_fn, AgentConfig, Tool, ToolChoice};
use troupe::grammar::Grammar;

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 256;
/// Deepest parenthesis nesting accepted.
pub const MAX_DEPTH: usize = 24;

/// Functions an expression may call (each takes numbers, costs O(1)).
pub const FUNCTIONS: &[&str] = &[
    "sqrt", "abs", "ln", "log10", "log2", "exp", "sin", "cos", "tan", "floor", "ceil", "round",
    "min", "max", "pow",
];

/// The form of a final answer: the number(s) the tool computed, so a small model
/// cannot wander off into prose and drop the result, or, when the tool refused the
/// expression, a sentence that says so (rather than a number it would have to invent).
pub const ANSWER: &str = r"The answer is -?[0-9][0-9.,e+-]*( and -?[0-9][0-9.,e+-]*)*\.|I cannot compute that: [^<\n]{1,120}";

/// Arguments of `calculate`.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
pub struct CalculateArgs {
    /// An arithmetic expression, e.g. `17 * 23` or `sqrt(2) / 3`.
    #[schemars(length(max = 256))]
    pub expression: String,
}

/// The calculator's configuration: a required tool call, then the answer.
pub fn config() -> AgentConfig {
    AgentConfig {
        tools: vec!["calculate".into()],
        tool_choice: ToolChoice::Required,
        max_tool_steps: 1,
        max_tokens: 96,
        grammar: Some(Grammar::Regex(ANSWER.into())),
        examples: example_exchange(
            "What is 6 times 7?",
            "calculate",
            serde_json::json!({"expression": "6 * 7"}),
            "42",
            "The answer is 42.",
        ),
        ..AgentConfig::new(
            "calculator",
            "You are a calculator. For every question, call calculate with the arithmetic expression, in numbers only (a quantity in units becomes its value times the conversion factor), then give the result.",
        )
    }
}

/// The calculator's tools.
pub fn tools() -> Vec<Arc<dyn Tool>> {
    vec![tool_fn(
        "calculate",
        "Evaluates an arithmetic expression: + - * / % ^ (power), parentheses, pi, e and the functions sqrt abs ln log10 log2 exp sin cos tan floor ceil round min max pow.",
        |a: CalculateArgs| async move { calculate(&a.expression) },
    )]
}

/// Evaluates `expression`; the error names what is wrong with it.
pub fn calculate(expression: &str) -> Result<String, String> {
    let expr = expression.trim();
    if expr.is_empty() {
        return Err("empty expression".into());
    }
    if expr.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "expression too long: {} bytes (limit {MAX_EXPRESSION_BYTES})",
            expr.len()
        ));
    }
    let floats = to_float_literals(expr)?;
    let mut ctx = evalexpr::HashMapContext::<DefaultNumericTypes>::new();
    ctx.set_builtin_functions_disabled(true)
        .map_err(|e| e.to_string())?;
    for (name, v) in [("pi", std::f64::consts::PI), ("e", std::f64::consts::E)] {
        ctx.set_value(name.into(), Value::Float(v))
            .map_err(|e| e.to_string())?;
    }
    for name in FUNCTIONS {
        ctx.set_function(name.to_string(), function(name))
            .map_err(|e| e.to_string())?;
    }
    let value = evalexpr::eval_with_context(&floats, &ctx)
        .map_err(|e| format!("cannot evaluate `{expr}`: {e}"))?;
    let x = value
        .as_number()
        .map_err(|_| format!("`{expr}` is not a number"))?;
    if !x.is_finite() {
        return Err(format!("`{expr}` has no finite value"));
    }
    Ok(format_number(x, 10))
}

/// Checks the characters and nesting, and writes every integer literal as a float so
/// that `7 / 2` is 3.5 (evalexpr divides integers as integers).
fn to_float_literals(expr: &str) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len() + 16);
    let mut depth = 0usize;
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            if !FUNCTIONS.contains(&name.as_str()) && name != "pi" && name != "e" {
                return Err(format!(
                    "unknown name `{name}` (functions: {})",
                    FUNCTIONS.join(" ")
                ));
            }
            out.push_str(&name);
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let lit: String = chars[start..i].iter().collect();
            if lit.matches('.').count() > 1 || lit == "." {
                return Err(format!("bad number `{lit}`"));
            }
            if lit.starts_with('.') {
                out.push('0');
            }
            out.push_str(&lit);
            if !lit.contains('.') {
                out.push_str(".0");
            } else if lit.ends_with('.') {
                out.push('0');
            }
            continue;
        }
        match c {
            '(' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("expression nested too deep (limit {MAX_DEPTH})"));
                }
            }
            ')' => depth = depth.saturating_sub(1),
            '+' | '-' | '*' | '/' | '%' | '^' | ',' | ' ' | '\t' => {}
            '×' => {
                out.push('*');
                i += 1;
                continue;
            }
            _ => return Err(format!("character `{c}` is not allowed in an expression")),
        }
        out.push(c);
        i += 1;
    }
    Ok(out)
}

fn function(name: &str) -> Function {
    let unary =
        |f: fn(f64) -> f64| Function::new(move |v: &Value| Ok(Value::Float(f(v.as_number()?))));
    let binary = |f: fn(f64, f64) -> f64| {
        Function::new(move |v: &Value| {
            let t = v.as_fixed_len_tuple(2)?;
            Ok(Value::Float(f(t[0].as_number()?, t[1].as_number()?)))
        })
    };
    match name {
        "sqrt" => unary(f64::sqrt),
        "abs" => unary(f64::abs),
        "ln" => unary(f64::ln),
        "log10" => unary(f64::log10),
        "log2" => unary(f64::log2),
        "exp" => unary(f64::exp),
        "sin" => unary(f64::sin),
        "cos" => unary(f64::cos),
        "tan" => unary(f64::tan),
        "floor" => unary(f64::floor),
        "ceil" => unary(f64::ceil),
        "round" => unary(f64::round),
        "min" => binary(f64::min),
        "max" => binary(f64::max),
        _ => binary(f64::powf),
    }
}

/// `x` with at most `digits` significant digits: whole numbers below 1e15 as
/// integers, others in plain decimals between 1e-6 and 1e15 and in exponent notation
/// outside, trailing zeros trimmed.
pub fn format_number(x: f64, digits: usize) -> String {
    let digits = digits.clamp(1, 17);
    let a = x.abs();
    if x == 0.0 {
        return "0".into();
    }
    if x == x.trunc() && a < 1e15 {
        return format!("{}", x as i64);
    }
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if (1e-6..1e15).contains(&a) {
        let int_digits = a.log10().floor() as i64 + 1;
        let decimals = (digits as i64 - int_digits).max(0) as usize;
        trim(format!("{x:.decimals$}"))
    } else {
        let s = format!("{x:.prec$e}", prec = digits - 1);
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        format!("{}e{exp}", trim(mantissa.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computes_arithmetic() {
        assert_eq!(calculate("17 * 23").unwrap(), "391");
        assert_eq!(calculate("7 / 2").unwrap(), "3.5");
        assert_eq!(calculate("(1 + 2) * 3 - 4 % 3").unwrap(), "8");
        assert_eq!(calculate("2 ^ 10").unwrap(), "1024");
        assert_eq!(calculate("sqrt(16) + max(2, 5)").unwrap(), "9");
        assert_eq!(calculate("pow(2, 0.5)").unwrap(), "1.414213562");
        assert_eq!(calculate(".5 * 4").unwrap(), "2");
        assert_eq!(calculate("-3 + 1").unwrap(), "-2");
        assert_eq!(calculate("12 × 3").unwrap(), "36");
        assert!(calculate("pi").unwrap().starts_with("3.14159"));
        // Significant digits, not decimal places; exponents outside 1e-6..1e15.
        assert_eq!(calculate("1 / 100000000000").unwrap(), "1e-11");
        assert_eq!(calculate("10 ^ 300").unwrap(), "1e300");
        assert_eq!(calculate("2 / 3 * 1000000").unwrap(), "666666.6667");
        assert_eq!(calculate("-1 / 3").unwrap(), "-0.3333333333");
    }

    #[test]
    fn refuses_bad_and_oversized_input() {
        let long = "1+".repeat(200) + "1";
        assert!(calculate(&long).unwrap_err().contains("too long"));
        let deep = "(".repeat(30) + "1" + &")".repeat(30);
        assert!(calculate(&deep).unwrap_err().contains("too deep"));
        assert!(calculate("x + 1").unwrap_err().contains("unknown name `x`"));
        assert!(calculate("a = 3").unwrap_err().contains("unknown name"));
        assert!(calculate("\"s\" + 1").unwrap_err().contains("not allowed"));
        assert!(calculate("1 / 0").unwrap_err().contains("no finite value"));
        assert!(calculate("10 ^ 400")
            .unwrap_err()
            .contains("no finite value"));
        assert!(calculate("1.2.3").unwrap_err().contains("bad number"));
        assert!(calculate("").unwrap_err().contains("empty"));
        assert!(calculate("1 +").unwrap_err().contains("cannot evaluate"));
        assert!(calculate("sqrt(1, 2, 3)").is_err());
    }

    #[tokio::test]
    async fn the_tool_checks_its_arguments() {
        let t = &tools()[0];
        let ok = t
            .call(serde_json::json!({"expression": "17 * 23"}))
            .await
            .unwrap();
        assert_eq!(ok, "391");
        let bad = t.call(serde_json::json!({"expr": "1"})).await.unwrap_err();
        assert!(bad.contains("bad arguments"), "{bad}");
    }
}
