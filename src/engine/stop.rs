//! Stop strings found across token boundaries: text that could still become a stop
//! string is held back, and a stop string is never part of the returned text.

/// Watches one generation's text for its stop strings.
#[derive(Debug, Clone, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet released (it may be the start of a stop string).
    pending: String,
}

/// What a new piece of text released.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released {
    /// Text that can be shown now.
    pub text: String,
    /// A stop string was completed; `text` ends right before it.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text.
    pub(crate) fn push(&mut self, piece: &str) -> Released {
        self.pending.push_str(piece);
        if self.stops.is_empty() {
            return Released {
                text: std::mem::take(&mut self.pending),
                stopped: false,
            };
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        // Hold back the longest tail that is the start of some stop string.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let rest = self.pending.split_off(hold);
        let text = std::mem::replace(&mut self.pending, rest);
        Released {
            text,
            stopped: false,
        }
    }

    /// Releases what was held back, at the end of the generation.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds pieces; returns the released text and whether it stopped.
    fn check(stops: &[&str], pieces: &[&str], expected: &str, stopped: bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        let mut did_stop = false;
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                did_stop = true;
                break;
            }
        }
        if !did_stop {
            out.push_str(&m.flush());
        }
        assert_eq!((out.as_str(), did_stop), (expected, stopped), "{pieces:?}");
    }

    #[test]
    fn stops_across_token_boundaries() {
        check(&["END"], &["hello E", "N", "D more"], "hello ", true);
        check(&["\n\n"], &["a\n", "\nb"], "a", true);
        check(&["stop", "xyz"], &["ab", "cxy", "z"], "abc", true);
    }

    #[test]
    fn held_back_text_is_released_when_it_cannot_match() {
        check(&["END"], &["E", "N", "O"], "ENO", false);
        check(&["END"], &["the E"], "the E", false);
        check(&[], &["a", "b"], "ab", false);
        check(&["é!"], &["caf", "é", "?"], "café?", false);
    }

    #[test]
    fn holds_only_what_could_still_match() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abcE").text, "abc");
        assert_eq!(m.push("N").text, "");
        assert_eq!(m.push("x").text, "ENx");
    }
}
