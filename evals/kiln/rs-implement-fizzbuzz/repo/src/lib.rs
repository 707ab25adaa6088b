/// "1", "2", "Fizz", "4", "Buzz", ..., "FizzBuzz" for multiples of 15.
pub fn fizzbuzz(n: u32) -> String {
    todo!("fizzbuzz of {n}")
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
