//! Stop strings: text is held back while it could still be the start of a stop string, so a stop
//! string split across tokens is never emitted.

/// Matches stop strings over a stream of text deltas.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Feeds a delta; returns the text safe to emit and whether a stop string was hit
    /// (then the text is everything before it).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that some stop string starts with.
        let held = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        let out = self.pending[..held].to_string();
        self.pending.drain(..held);
        (out, false)
    }

    /// The held-back text, once generation ended without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_split_across_deltas_is_not_emitted() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        let mut out = String::new();
        for d in ["Hello", " there\n", "\nUs", "er: more"] {
            let (t, stop) = m.push(d);
            out.push_str(&t);
            if stop {
                assert_eq!(out, "Hello there");
                return;
            }
        }
        panic!("stop string not found");
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the EN"), ("the ".to_string(), false));
        assert_eq!(m.push("D"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.push("ough"), ("ENough".to_string(), false));
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.flush(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "ab".into()]);
        assert_eq!(m.push("xxabyy"), ("xx".to_string(), true));
    }
}
