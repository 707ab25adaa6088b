/// Whether `s` reads the same backwards, ignoring case and non-alphanumerics.
pub fn is_palindrome(s: &str) -> bool {
    unimplemented!("{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palindromes() {
        assert!(is_palindrome("A man, a plan, a canal: Panama"));
        assert!(is_palindrome(""));
        assert!(is_palindrome("Été"));
        assert!(!is_palindrome("kiln"));
    }
}
