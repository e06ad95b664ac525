//! The clock-and-units agent: the current date and time (`now`, via chrono) and unit
//! conversions (`convert`) over a table of length, mass, time, volume, area, speed,
//! data and temperature units. Converting between kinds, or an unknown unit, is
//! refused with the list of what is known.
//!
//! Example tasks: "What day of the week is it?", "Convert 26.2 miles to kilometres."

use std::sync::Arc;

use chrono::{Datelike, Utc};
use troupe::agent::{example_exchange, tool_fn, AgentConfig, Tool};

/// A unit: names it is known by, its kind, and how it maps to the kind's base unit
/// (`base = value * scale + offset`).
struct Unit {
    names: &'static [&'static str],
    kind: &'static str,
    scale: f64,
    offset: f64,
}

const fn u(names: &'static [&'static str], kind: &'static str, scale: f64) -> Unit {
    Unit {
        names,
        kind,
        scale,
        offset: 0.0,
    }
}

/// The table (base units: metre, kilogram, second, litre, square metre, metre per
/// second, byte, kelvin).
const UNITS: &[Unit] = &[
    u(&["m", "meter", "meters", "metre", "metres"], "length", 1.0),
    u(
        &["km", "kilometer", "kilometers", "kilometre", "kilometres"],
        "length",
        1000.0,
    ),
    u(
        &[
            "cm",
            "centimeter",
            "centimeters",
            "centimetre",
            "centimetres",
        ],
        "length",
        0.01,
    ),
    u(
        &[
            "mm",
            "millimeter",
            "millimeters",
            "millimetre",
            "millimetres",
        ],
        "length",
        0.001,
    ),
    u(&["mi", "mile", "miles"], "length", 1609.344),
    u(&["yd", "yard", "yards"], "length", 0.9144),
    u(&["ft", "foot", "feet"], "length", 0.3048),
    u(&["in", "inch", "inches"], "length", 0.0254),
    u(
        &["nmi", "nautical mile", "nautical miles"],
        "length",
        1852.0,
    ),
    u(
        &["kg", "kilogram", "kilograms", "kilo", "kilos"],
        "mass",
        1.0,
    ),
    u(&["g", "gram", "grams"], "mass", 0.001),
    u(&["mg", "milligram", "milligrams"], "mass", 1e-6),
    u(&["t", "tonne", "tonnes", "metric ton"], "mass", 1000.0),
    u(&["lb", "lbs", "pound", "pounds"], "mass", 0.453_592_37),
    u(&["oz", "ounce", "ounces"], "mass", 0.028_349_523_125),
    u(&["st", "stone", "stones"], "mass", 6.350_293_18),
    u(&["s", "sec", "second", "seconds"], "time", 1.0),
    u(&["ms", "millisecond", "milliseconds"], "time", 0.001),
    u(&["min", "minute", "minutes"], "time", 60.0),
    u(&["h", "hr", "hour", "hours"], "time", 3600.0),
    u(&["d", "day", "days"], "time", 86400.0),
    u(&["week", "weeks"], "time", 604_800.0),
    u(&["l", "liter", "liters", "litre", "litres"], "volume", 1.0),
    u(
        &[
            "ml",
            "milliliter",
            "milliliters",
            "millilitre",
            "millilitres",
        ],
        "volume",
        0.001,
    ),
    u(
        &["m3", "cubic meter", "cubic meters", "cubic metre"],
        "volume",
        1000.0,
    ),
    u(
        &["gal", "gallon", "gallons", "us gallon"],
        "volume",
        3.785_411_784,
    ),
    u(&["qt", "quart", "quarts"], "volume", 0.946_352_946),
    u(&["pt", "pint", "pints"], "volume", 0.473_176_473),
    u(&["cup", "cups"], "volume", 0.236_588_236_5),
    u(
        &["m2", "square meter", "square meters", "square metre"],
        "area",
        1.0,
    ),
    u(
        &["km2", "square kilometer", "square kilometers"],
        "area",
        1e6,
    ),
    u(&["ha", "hectare", "hectares"], "area", 1e4),
    u(&["acre", "acres"], "area", 4_046.856_422_4),
    u(&["ft2", "square foot", "square feet"], "area", 0.092_903_04),
    u(
        &["m/s", "meters per second", "metres per second"],
        "speed",
        1.0,
    ),
    u(
        &["km/h", "kph", "kilometers per hour", "kilometres per hour"],
        "speed",
        1.0 / 3.6,
    ),
    u(&["mph", "miles per hour"], "speed", 0.44704),
    u(&["kn", "knot", "knots"], "speed", 1852.0 / 3600.0),
    u(&["b", "byte", "bytes"], "data", 1.0),
    u(&["kb", "kilobyte", "kilobytes"], "data", 1e3),
    u(&["mb", "megabyte", "megabytes"], "data", 1e6),
    u(&["gb", "gigabyte", "gigabytes"], "data", 1e9),
    u(&["tb", "terabyte", "terabytes"], "data", 1e12),
    u(&["kib", "kibibyte", "kibibytes"], "data", 1024.0),
    u(&["mib", "mebibyte", "mebibytes"], "data", 1_048_576.0),
    u(&["gib", "gibibyte", "gibibytes"], "data", 1_073_741_824.0),
    u(&["k", "kelvin"], "temperature", 1.0),
    Unit {
        names: &["c", "°c", "celsius", "degrees celsius"],
        kind: "temperature",
        scale: 1.0,
        offset: 273.15,
    },
    Unit {
        names: &["f", "°f", "fahrenheit", "degrees fahrenheit"],
        kind: "temperature",
        scale: 5.0 / 9.0,
        offset: 273.15 - 32.0 * 5.0 / 9.0,
    },
];

fn unit(name: &str) -> Result<&'static Unit, String> {
    let key = name.trim().to_lowercase();
    UNITS
        .iter()
        .find(|u| u.names.contains(&key.as_str()))
        .ok_or_else(|| {
            let known: Vec<&str> = UNITS.iter().map(|u| u.names[0]).collect();
            format!("unknown unit `{name}` (known: {})", known.join(", "))
        })
}

/// Converts `value` from one unit to another; the error names an unknown unit or the
/// two kinds that do not convert.
pub fn convert(value: f64, from: &str, to: &str) -> Result<String, String> {
    if !value.is_finite() {
        return Err("the value must be a finite number".into());
    }
    let (a, b) = (unit(from)?, unit(to)?);
    if a.kind != b.kind {
        return Err(format!(
            "cannot convert {} (`{from}`) to {} (`{to}`)",
            a.kind, b.kind
        ));
    }
    let x = (value * a.scale + a.offset - b.offset) / b.scale;
    if !x.is_finite() {
        return Err(format!("{value} {from} in {to} is too large"));
    }
    // What is left of the offsets' cancellation (32 F -> 0 C) is rounding, not value.
    let magnitude = ((value * a.scale).abs() + a.offset.abs() + b.offset.abs()) / b.scale;
    let x = if x.abs() < magnitude * 1e-12 { 0.0 } else { x };
    Ok(format!(
        "{value} {from} = {} {to}",
        super::calculator::format_number(x, 8)
    ))
}

/// The current date and time in UTC, with the weekday.
pub fn now() -> String {
    let t = Utc::now();
    format!(
        "{} ({}, UTC; day {} of the year)",
        t.format("%Y-%m-%d %H:%M:%S"),
        t.format("%A"),
        t.ordinal()
    )
}

/// Arguments of `now`.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
pub struct NowArgs {}

/// Arguments of `convert`.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
pub struct ConvertArgs {
    /// The amount.
    pub value: f64,
    /// Its unit, e.g. `mi`, `kg`, `celsius`.
    #[schemars(length(max = 32))]
    pub from: String,
    /// The unit wanted.
    #[schemars(length(max = 32))]
    pub to: String,
}

/// The clock-and-units tools.
pub fn tools() -> Vec<Arc<dyn Tool>> {
    vec![
        tool_fn(
            "now",
            "The current date, time and weekday (UTC).",
            |_: NowArgs| async { Ok(now()) },
        ),
        tool_fn(
            "convert",
            "Converts an amount between units of length, mass, time, volume, area, speed, data or temperature.",
            |a: ConvertArgs| async move { convert(a.value, &a.from, &a.to) },
        ),
    ]
}

/// The clock-and-units agent's configuration.
pub fn config() -> AgentConfig {
    AgentConfig {
        tools: vec!["now".into(), "convert".into()],
        tool_choice: troupe::agent::ToolChoice::Required,
        max_tool_steps: 1,
        max_tokens: 96,
        examples: [
            example_exchange(
                "How many pounds is 3 kg?",
                "convert",
                serde_json::json!({"value": 3, "from": "kg", "to": "pounds"}),
                "3 kg = 6.613868 pounds",
                "3 kg is about 6.61 pounds.",
            ),
            example_exchange(
                "Convert 2 metres to feet.",
                "convert",
                serde_json::json!({"value": 2, "from": "metres", "to": "feet"}),
                "2 metres = 6.56168 feet",
                "2 metres is about 6.56 feet.",
            ),
            example_exchange(
                "What time is it?",
                "now",
                serde_json::json!({}),
                "2024-03-05 14:02:10 (Tuesday, UTC; day 65 of the year)",
                "It is 14:02 UTC on Tuesday, 5 March 2024.",
            ),
        ]
        .concat(),
        ..AgentConfig::new(
            "clock",
            "You tell the date and time and convert units. Always call a tool first (now for the date and time, convert for units), then answer in one sentence.",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_within_a_kind() {
        assert_eq!(
            convert(26.2, "miles", "km").unwrap(),
            "26.2 miles = 42.164813 km"
        );
        assert_eq!(convert(100.0, "C", "F").unwrap(), "100 C = 212 F");
        assert_eq!(
            convert(32.0, "fahrenheit", "celsius").unwrap(),
            "32 fahrenheit = 0 celsius"
        );
        assert_eq!(
            convert(0.0, "celsius", "kelvin").unwrap(),
            "0 celsius = 273.15 kelvin"
        );
        assert_eq!(convert(1.0, "GiB", "MiB").unwrap(), "1 GiB = 1024 MiB");
        assert_eq!(convert(2.0, "hours", "min").unwrap(), "2 hours = 120 min");
        assert_eq!(convert(1.0, "lb", "g").unwrap(), "1 lb = 453.59237 g");
        assert_eq!(convert(36.0, "km/h", "m/s").unwrap(), "36 km/h = 10 m/s");
        assert_eq!(convert(1.0, "byte", "GB").unwrap(), "1 byte = 1e-9 GB");
        assert_eq!(convert(-40.0, "C", "F").unwrap(), "-40 C = -40 F");
    }

    #[test]
    fn refuses_unknown_units_and_mixed_kinds() {
        let e = convert(1.0, "furlong", "m").unwrap_err();
        assert!(
            e.contains("unknown unit `furlong`") && e.contains("known: m, km"),
            "{e}"
        );
        let e = convert(1.0, "kg", "m").unwrap_err();
        assert_eq!(e, "cannot convert mass (`kg`) to length (`m`)");
        assert!(convert(f64::NAN, "kg", "g").is_err());
        assert!(convert(1e308, "km", "mm")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn now_is_today() {
        // Dates read on both sides of the call: at midnight they differ, and the
        // answer may carry either.
        let before = Utc::now().format("%Y-%m-%d").to_string();
        let s = now();
        let after = Utc::now().format("%Y-%m-%d").to_string();
        assert!(s.starts_with(&before) || s.starts_with(&after), "{s}");
        assert!(s.contains("UTC"));
    }

    #[tokio::test]
    async fn the_tools_run_through_the_tool_interface() {
        let t = tools();
        let out = t[1]
            .call(serde_json::json!({"value": 5, "from": "km", "to": "m"}))
            .await
            .unwrap();
        assert_eq!(out, "5 km = 5000 m");
        let e = t[1]
            .call(serde_json::json!({"value": 5, "from": "km", "to": "parsec"}))
            .await
            .unwrap_err();
        assert!(e.contains("unknown unit"));
        assert!(t[0]
            .call(serde_json::json!({}))
            .await
            .unwrap()
            .contains("UTC"));
    }
}
