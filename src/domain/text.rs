//! What text an invoice may carry. The tax authority's invoice is an XML document, and XML
//! 1.0 has no way to write most C0 control characters; Postgres refuses NUL in `text` and in
//! `jsonb`. Such a character in an input is refused with its field named, rather than failing
//! at the database (a batch isolated, a 500) or at the provider (a permanent error later).

/// The first character `text` may not carry: a C0 control other than tab, line feed and
/// carriage return, or one of the non-characters U+FFFE and U+FFFF.
pub fn forbidden_char(text: &str) -> Option<char> {
    text.chars()
        .find(|&c| (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{FFFE}' | '\u{FFFF}'))
}

/// The reason a field with a forbidden character is refused, naming the character by code
/// point (never quoting the value, which may be personal data).
pub fn forbidden_reason(c: char) -> String {
    format!("contains the character U+{:04X}, which an invoice cannot carry", c as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn controls_that_xml_cannot_write_are_found() {
        assert_eq!(forbidden_char("Nguyễn Văn A"), None);
        assert_eq!(forbidden_char("line one\nline two\ttab\r"), None);
        assert_eq!(forbidden_char("a\u{0}b"), Some('\u{0}'));
        assert_eq!(forbidden_char("bell\u{7}"), Some('\u{7}'));
        assert_eq!(forbidden_char("\u{FFFF}"), Some('\u{FFFF}'));
        assert_eq!(forbidden_reason('\u{0}'), "contains the character U+0000, which an invoice cannot carry");
    }

    proptest! {
        #[test]
        fn printable_text_is_never_refused(s in "[\\PC\t\n\r]*") {
            prop_assert_eq!(forbidden_char(&s), None);
        }
    }
}
