/// The arithmetic mean, or None for an empty slice.
pub fn mean(xs: &[u32]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let total: u64 = xs.iter().map(|&x| u64::from(x)).sum();
    Some(total as f64 / xs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means() {
        assert_eq!(mean(&[1, 2, 3, 4]), Some(2.5));
        assert_eq!(mean(&[]), None);
    }
}
