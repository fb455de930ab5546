//! OpenAI's shared wordings, used by the domain's own conversions into [`GatewayError`]s
//! (`edit::form`'s `FormError`, `limits`' `EndUserError` and `RateRefusal`, which live beside
//! the types they convert) and by the GPT-image checks.

/// `'a'`, `'a' and 'b'`, `'a', 'b', and 'c'`: OpenAI's list wording.
pub(crate) fn quoted_list(values: &[&str]) -> String {
    let q: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    match q.len() {
        0 => String::new(),
        1 => q[0].clone(),
        2 => format!("{} and {}", q[0], q[1]),
        n => format!("{}, and {}", q[..n - 1].join(", "), q[n - 1]),
    }
}

/// OpenAI's "string too long" wording.
pub(crate) fn too_long(param: &str, max: usize, got: usize) -> String {
    format!(
        "Invalid '{param}': string too long. Expected a string with maximum length {max}, but got a string with length {got} instead."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_worded_as_openai_words_them() {
        assert_eq!(quoted_list(&["a"]), "'a'");
        assert_eq!(quoted_list(&["a", "b"]), "'a' and 'b'");
        assert_eq!(quoted_list(&["a", "b", "c"]), "'a', 'b', and 'c'");
    }
}
