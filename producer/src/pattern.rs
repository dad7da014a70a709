//! Name patterns in the configuration (`public.*`, `*.example.com`): `*` is the only
//! wildcard and matches any run of characters, none included.

/// Whether `name` matches `pattern`.
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| matches(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn a_star_matches_any_run_of_characters() {
        assert!(matches("public.*", "public.orders"));
        assert!(matches("public.*", "public."));
        assert!(matches("*.example.com", "gateway.example.com"));
        assert!(matches("a*b*c", "a-b-x-c"));
        assert!(matches("ünï*", "ünïcode"));
        assert!(!matches("public.*", "private.orders"));
        assert!(!matches("orders", "orders2"));
        assert!(!matches("a*b", "a-c"));
    }
}
