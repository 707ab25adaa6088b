pub fn describe_c(c: f64) -> String {
    let f = c * 9.0 / 5.0 + 32.0;
    format!("{:.1} °C ({:.1} °F)", c, f)
}

pub fn describe_f(f: f64) -> String {
    let c = (f - 32.0) * 5.0 / 9.0;
    let f = c * 9.0 / 5.0 + 32.0;
    format!("{:.1} °C ({:.1} °F)", c, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperatures() {
        assert_eq!(describe_c(21.5), "21.5 °C (70.7 °F)");
        assert_eq!(describe_f(212.0), "100.0 °C (212.0 °F)");
    }
}
