/// The largest element, or None for an empty slice.
pub fn largest(xs: &[i32]) -> Option<i32> {
    let mut best = *xs.first()?;
    for &x in xs {
        if x < best {
            best = x;
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_largest() {
        assert_eq!(largest(&[3, 9, -2, 7]), Some(9));
        assert_eq!(largest(&[-5]), Some(-5));
        assert_eq!(largest(&[]), None);
    }
}
