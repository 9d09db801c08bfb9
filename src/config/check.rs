//! Range checks a TOML type cannot express, written once per field: a rule's
//! `validate` says `check!(section, self.field, condition)`, and the error
//! names `section.field`, its value and the condition's reason.

use std::fmt::Display;

use super::ConfigError;

/// What a setting must satisfy, and how an error says it.
pub(super) trait Condition<T> {
    fn holds(&self, value: T) -> bool;
    fn reason(&self) -> String;
}

/// Fails naming `section.field = value` unless `condition` holds for `value`.
pub(super) fn check_field<T: Copy + Display>(
    section: &str,
    field: &str,
    value: T,
    condition: impl Condition<T>,
) -> Result<(), ConfigError> {
    if condition.holds(value) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: format!("{section}.{field}"),
            value: value.to_string(),
            reason: condition.reason(),
        })
    }
}

/// `check!(section, self.field, condition)`: checks one field of a rule's
/// settings, naming it once.
macro_rules! check {
    ($section:expr, $rule:ident . $field:ident, $condition:expr $(,)?) => {
        $crate::config::check::check_field($section, stringify!($field), $rule.$field, $condition)
    };
}
pub(super) use check;

/// Strictly between 0 and 1 (a smoothing factor, a fraction).
pub(super) fn unit() -> impl Condition<f64> {
    when(|x: f64| x > 0.0 && x < 1.0, "must be between 0 and 1")
}

/// Finite and above 0.
pub(super) fn positive() -> impl Condition<f64> {
    when(|x: f64| x.is_finite() && x > 0.0, "must be positive")
}

/// 0 or more.
pub(super) fn not_negative() -> impl Condition<f64> {
    when(|x: f64| x >= 0.0, "must not be negative")
}

/// Strictly above `min` (a growth factor above 1).
pub(super) fn above<T: PartialOrd + Display + Copy>(min: T) -> impl Condition<T> {
    when(move |x: T| x > min, format!("must be above {min}"))
}

/// `min` or more.
pub(super) fn at_least<T: PartialOrd + Display + Copy>(min: T) -> impl Condition<T> {
    when(move |x: T| x >= min, format!("must be at least {min}"))
}

/// Any other condition, with its reason.
pub(super) fn when<T>(holds: impl Fn(T) -> bool, reason: impl Into<String>) -> impl Condition<T> {
    When {
        holds,
        reason: reason.into(),
    }
}

struct When<F> {
    holds: F,
    reason: String,
}

impl<T, F: Fn(T) -> bool> Condition<T> for When<F> {
    fn holds(&self, value: T) -> bool {
        (self.holds)(value)
    }

    fn reason(&self) -> String {
        self.reason.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Example {
        window: u32,
        alpha: f64,
    }

    impl Example {
        fn validate(&self, section: &str) -> Result<(), ConfigError> {
            check!(section, self.window, at_least(3))?;
            check!(section, self.alpha, unit())
        }
    }

    #[test]
    fn an_error_names_the_section_field_value_and_reason() {
        assert!(Example { window: 3, alpha: 0.5 }.validate("x").is_ok());
        let err = Example { window: 2, alpha: 0.5 }.validate("x").unwrap_err();
        assert_eq!(err.to_string(), "invalid rule setting x.window = 2: must be at least 3");
        let err = Example { window: 3, alpha: 1.0 }.validate("y").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid rule setting y.alpha = 1: must be between 0 and 1"
        );
    }

    #[test]
    fn conditions_reject_nan() {
        for condition in [
            unit().holds(f64::NAN),
            positive().holds(f64::NAN),
            above(1.0).holds(f64::NAN),
        ] {
            assert!(!condition);
        }
        assert!(!not_negative().holds(f64::NAN) && !at_least(1.0).holds(f64::NAN));
        assert!(!positive().holds(f64::INFINITY));
    }
}
