/// Appends `s` and returns (a copy of) the first element.
pub fn push_and_first(v: &mut Vec<String>, s: &str) -> String {
    let first = v[0].clone();
    v.push(s.to_string());
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_reports_the_first() {
        let mut v = vec![String::from("a")];
        assert_eq!(push_and_first(&mut v, "b"), "a");
        assert_eq!(v, ["a", "b"]);
    }
}
