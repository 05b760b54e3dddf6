//! Stop strings: text is held back while it could still be the start of a stop string.

/// Tracks generated text against stop strings, releasing only text that is decided.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released.
    pending: String,
}

pub enum StopOutcome {
    /// Text safe to release now (may be empty).
    Continue(String),
    /// A stop string matched: the text before it, and which stop string.
    Stopped(String, String),
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        // The earliest complete match wins.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i);
        if let Some((i, s)) = hit {
            let before = self.pending[..i].to_string();
            let s = s.clone();
            self.pending.clear();
            return StopOutcome::Stopped(before, s);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s
                .char_indices()
                .skip(1)
                .chain(std::iter::once((s.len(), ' ')))
            {
                let prefix = &s[..k];
                if k <= self.pending.len() && self.pending.ends_with(prefix) {
                    hold = hold.max(k);
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Release whatever is held (generation ended for another reason).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped(t, s) => {
                    out.push_str(&t);
                    return (out, Some(s));
                }
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_split_across_pieces() {
        assert_eq!(
            run(&["</s>"], &["Hello <", "/", "s> world"]),
            ("Hello ".into(), Some("</s>".into()))
        );
    }

    #[test]
    fn held_text_is_released_when_not_a_stop() {
        assert_eq!(run(&["STOP"], &["a ST", "x"]), ("a STx".into(), None));
    }

    #[test]
    fn multibyte_text_is_safe() {
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), None));
        assert_eq!(
            run(&["é!"], &["café", "!"]),
            ("caf".into(), Some("é!".into()))
        );
    }
}
