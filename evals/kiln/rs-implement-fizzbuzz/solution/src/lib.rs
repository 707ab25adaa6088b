/// "1", "2", "Fizz", "4", "Buzz", ..., "FizzBuzz" for multiples of 15.
pub fn fizzbuzz(n: u32) -> String {
    match (n % 3, n % 5) {
        (0, 0) => "FizzBuzz".into(),
        (0, _) => "Fizz".into(),
        (_, 0) => "Buzz".into(),
        _ => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        let got: Vec<String> = (1..=15).map(fizzbuzz).collect();
        assert_eq!(
            got.join(","),
            "1,2,Fizz,4,Buzz,Fizz,7,8,Fizz,Buzz,11,Fizz,13,14,FizzBuzz"
        );
    }
}
