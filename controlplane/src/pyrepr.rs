//! Python's `repr()` of strings and lists of strings, for upstream's message texts
//! (`Requests ['r1', 'r2'] aborted.`).

use std::fmt::Write;

/// `s` as an error message may echo it: whole up to `max` bytes, else its first `max` bytes
/// (at a character boundary) and how long it was, so no error carries unbounded input.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len()).into()
}

/// `repr(s)` for a Python `str`.
pub fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `repr(list_of_str)`.
pub fn list_repr(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| str_repr(s)).collect();
    format!("[{}]", inner.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python() {
        assert_eq!(list_repr(&["r1".into(), "r2".into()]), "['r1', 'r2']");
        assert_eq!(list_repr(&[]), "[]");
        assert_eq!(str_repr("it's"), "\"it's\"");
        assert_eq!(str_repr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(str_repr("x\ny\\"), "'x\\ny\\\\'");
        assert_eq!(str_repr("\u{1}"), "'\\x01'");
    }

    #[test]
    fn clipped_echoes_are_bounded_and_keep_characters_whole() {
        assert_eq!(clip("10.0.0.1", 64), "10.0.0.1");
        let long = "é".repeat(100_000);
        let c = clip(&long, 65);
        assert!(c.len() < 100 && c.ends_with("(200000 bytes)"), "{c}");
        assert!(c.starts_with(&"é".repeat(32)));
    }
}
