//! User fields that cannot hold invalid values: parse once at the edge, trust afterwards.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("name must be 1 to 200 characters without control characters")]
    Name,
    #[error("email must look like name@example.com (at most 254 characters)")]
    Email,
    #[error("phone must have 7 to 15 digits, optionally with +, spaces, dashes or parentheses")]
    Phone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserName(String);

impl UserName {
    pub fn parse(raw: &str) -> Result<UserName, FieldError> {
        let name = raw.trim();
        let len = name.chars().count();
        if len == 0 || len > 200 || name.chars().any(char::is_control) {
            return Err(FieldError::Name);
        }
        Ok(UserName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A syntactically plausible address, lower-cased so uniqueness ignores case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Email, FieldError> {
        let email = raw.trim().to_lowercase();
        if email.len() > 254 {
            return Err(FieldError::Email);
        }
        let (local, domain) = email.split_once('@').ok_or(FieldError::Email)?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
        let labels: Vec<&str> = domain.split('.').collect();
        let domain_ok = labels.len() >= 2
            && labels.iter().all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
            && labels
                .last()
                .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
        if !local_ok || !domain_ok {
            return Err(FieldError::Email);
        }
        Ok(Email(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phone(String);

impl Phone {
    pub fn parse(raw: &str) -> Result<Phone, FieldError> {
        let phone = raw.trim();
        let digits = phone.chars().filter(char::is_ascii_digit).count();
        let allowed = phone
            .chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_digit() || " -()".contains(c) || (c == '+' && i == 0));
        if !allowed || !(7..=15).contains(&digits) {
            return Err(FieldError::Phone);
        }
        Ok(Phone(phone.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            Email::parse(" Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        assert!(Email::parse("a.b+tag@mail.example.co").is_ok());
        for bad in [
            "",
            "ada",
            "ada@",
            "@x.io",
            "ada@x",
            "a b@x.io",
            "ada@x..io",
            "ada@-x.io",
            "ada@x.i0",
            ".a@x.io",
            "a@b@c.io",
        ] {
            assert_eq!(Email::parse(bad), Err(FieldError::Email), "{bad}");
        }
        assert!(Email::parse(&format!("{}@x.io", "a".repeat(65))).is_err());
    }

    #[test]
    fn names_and_phones() {
        assert_eq!(
            UserName::parse("  Ada Lovelace ").unwrap().as_str(),
            "Ada Lovelace"
        );
        assert!(UserName::parse("   ").is_err());
        assert!(UserName::parse("a\u{0}b").is_err());
        assert!(UserName::parse(&"x".repeat(201)).is_err());
        assert!(Phone::parse("+91 98765-43210").is_ok());
        assert!(Phone::parse("(555) 123 4567").is_ok());
        assert!(Phone::parse("12345").is_err());
        assert!(Phone::parse("555-CALL-NOW").is_err());
        assert!(Phone::parse("1+2345678").is_err());
    }
}
