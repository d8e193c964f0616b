//! Client-supplied names (models, tensors, regions) echoed in error texts are cut to a bounded
//! length: a 10 KB name must not make an error larger than clients' metadata limits.
use std::borrow::Cow;
use std::fmt;

/// The most bytes of a name an error text repeats.
pub const MAX_SHOWN_NAME_BYTES: usize = 256;

/// The most bytes of an error text sent to a client.
pub const MAX_ERROR_TEXT_BYTES: usize = 4096;

/// Displays a name cut to [`MAX_SHOWN_NAME_BYTES`] (at a character boundary), with an ellipsis and
/// the full length when it was cut.
pub struct Shown<'a>(pub &'a str);

/// Shorthand for `Shown(name)` in `format!` arguments.
pub fn shown(name: &str) -> Shown<'_> {
    Shown(name)
}

/// The text `shown` displays, borrowed when the name is short enough to show whole (the usual case,
/// so a name kept for later errors costs no copy).
pub fn shown_str(name: &str) -> Cow<'_, str> {
    if name.len() <= MAX_SHOWN_NAME_BYTES {
        return Cow::Borrowed(name);
    }
    Cow::Owned(shown(name).to_string())
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.0;
        if name.len() <= MAX_SHOWN_NAME_BYTES {
            return f.write_str(name);
        }
        let cut = prefix(name, MAX_SHOWN_NAME_BYTES);
        write!(f, "{cut}...({} bytes)", name.len())
    }
}

/// An error text cut to [`MAX_ERROR_TEXT_BYTES`]: the last guard for texts built from names this
/// module did not see (e.g. a lookup of an unknown model).
pub fn bounded_text(text: String) -> String {
    if text.len() <= MAX_ERROR_TEXT_BYTES {
        return text;
    }
    format!(
        "{}...({} bytes)",
        prefix(&text, MAX_ERROR_TEXT_BYTES),
        text.len()
    )
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn prefix(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_shown_whole() {
        assert_eq!(shown("input0").to_string(), "input0");
    }

    #[test]
    fn shown_str_borrows_a_short_name_and_cuts_a_long_one_as_shown_does() {
        assert!(matches!(shown_str("input0"), Cow::Borrowed("input0")));
        let name = "n".repeat(10_000);
        assert_eq!(shown_str(&name), shown(&name).to_string());
    }

    #[test]
    fn long_names_are_cut_with_an_ellipsis_and_their_length() {
        let name = "n".repeat(10_000);
        let text = shown(&name).to_string();
        assert!(text.len() < MAX_SHOWN_NAME_BYTES + 32, "{}", text.len());
        assert!(text.ends_with("...(10000 bytes)"), "{text}");
    }

    #[test]
    fn cuts_land_on_character_boundaries() {
        let name = "é".repeat(300);
        let text = shown(&name).to_string();
        assert!(text.starts_with(&"é".repeat(128)));
        let long = "ü".repeat(5000);
        assert!(bounded_text(long).len() < MAX_ERROR_TEXT_BYTES + 32);
    }
}
