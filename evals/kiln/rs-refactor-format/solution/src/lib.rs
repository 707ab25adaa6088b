fn format_temp(celsius: f64) -> String {
    let f = celsius * 9.0 / 5.0 + 32.0;
    format!("{:.1} °C ({:.1} °F)", celsius, f)
}

pub fn describe_c(c: f64) -> String {
    format_temp(c)
}

pub fn describe_f(f: f64) -> String {
    format_temp((f - 32.0) * 5.0 / 9.0)
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
