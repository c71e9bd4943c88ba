//! Parsing libtest's summary lines and adding up results.

/// Passed/failed counts of one test binary, one side, or the whole run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
    }

    pub fn total(&self) -> u64 {
        self.passed + self.failed
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)
    }
}

/// Parses a libtest summary such as
/// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`
/// or `test result: FAILED. 2 passed; 1 failed; ...`. The summary may be
/// preceded by other text on the same line (console output interleaving).
pub fn parse_summary(line: &str) -> Option<Counts> {
    let rest = &line[line.find("test result: ")? + "test result: ".len()..];
    let rest = rest
        .strip_prefix("ok.")
        .or_else(|| rest.strip_prefix("FAILED."))?;
    let mut counts = Counts::default();
    let mut seen = (false, false);
    for part in rest.split(';') {
        let mut words = part.split_whitespace();
        let (Some(number), Some(label)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = number.parse::<u64>() else {
            continue;
        };
        match label {
            "passed" => {
                counts.passed = n;
                seen.0 = true;
            }
            "failed" => {
                counts.failed = n;
                seen.1 = true;
            }
            _ => {}
        }
    }
    (seen.0 && seen.1).then_some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_line() {
        let c = parse_summary(
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        assert_eq!(
            c,
            Some(Counts {
                passed: 3,
                failed: 0
            })
        );
    }

    #[test]
    fn failed_line_with_prefix() {
        let c = parse_summary(
            "[  12.3] x test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        assert_eq!(
            c,
            Some(Counts {
                passed: 2,
                failed: 1
            })
        );
    }

    #[test]
    fn not_a_summary() {
        assert_eq!(parse_summary("test foo ... ok"), None);
        assert_eq!(
            parse_summary("test result: maybe. 1 passed; 0 failed"),
            None
        );
        assert_eq!(parse_summary("test result: ok. garbage"), None);
    }
}
