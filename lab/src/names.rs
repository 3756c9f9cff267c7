//! Names in a lab, and the rules they follow. Checked here, at the bottom,
//! so every layer above can rely on them.

use crate::Error;

/// Longest lab name (keeps Unix socket paths within their limit).
pub const MAX_NAME_LEN: usize = 24;

/// Checks a lab name: a Kubernetes-style name of at most
/// [`MAX_NAME_LEN`] characters.
pub fn check_lab_name(name: &str) -> Result<(), Error> {
    if name.len() > MAX_NAME_LEN {
        return Err(Error::Spec(format!(
            "lab name {name:?} is longer than {MAX_NAME_LEN} characters"
        )));
    }
    check_dns_label("lab name", name)
}

/// Kubernetes names (RFC 1123 labels): lowercase letters, digits and `-`,
/// starting and ending with a letter or digit, at most 63 characters.
pub fn check_dns_label(what: &str, name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(Error::Spec(format!(
            "{what} {name:?} is not a valid name (lowercase letters, digits and '-', at most 63)"
        )))
    }
}
