//! "did you mean": the closest name within two edits, as BuildKit's `util/suggest` picks it.

/// The option closest to `value` (Levenshtein distance below 3, the first of equals), or
/// `None` when there is none or `value` is itself an option.
pub(crate) fn search<'a>(
    value: &str,
    options: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best = None;
    let mut min = 3;
    for option in options {
        if option == value {
            return None;
        }
        let d = levenshtein(value, option);
        if d < min {
            min = d;
            best = Some(option);
        }
    }
    best
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_within_two_edits() {
        assert_eq!(search("PAHT", ["HOME", "PATH"]), Some("PATH"));
        assert_eq!(
            search("DIR_ASSET", ["DIR_BINARIES", "DIR_ASSETS"]),
            Some("DIR_ASSETS")
        );
        assert_eq!(
            search("BULIDPLATFORM", ["BUILDPLATFORM"]),
            Some("BUILDPLATFORM")
        );
        assert_eq!(search("foo", ["PATH"]), None);
        assert_eq!(search("PATH", ["PATH", "PAT"]), None);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }
}
