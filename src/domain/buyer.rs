//! The buyer object (SPEC §5), the same in payments, claims and requests, and its
//! validation: a tax code must be well-formed with its check digit (DOMAIN §7), and a
//! company invoice needs the legal name and address.

use serde::{Deserialize, Serialize};

use super::tax_code::{self, TaxCode};

/// The buyer as sent on the wire; every member optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Buyer {
    /// Person's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Company's legal name (required with a tax code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legal_name: Option<String>,
    /// Tax code or 12-digit personal id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tax_code: Option<String>,
    /// Address (required with a tax code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Email for the invoice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

/// Who the invoice is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuyerKind {
    /// A consumer who gave no tax identity.
    Consumer,
    /// An individual identified by a 12-digit personal id.
    Individual,
    /// A company (10-digit tax code, or a branch).
    Company,
}

impl BuyerKind {
    /// The database and label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BuyerKind::Consumer => "consumer",
            BuyerKind::Individual => "individual",
            BuyerKind::Company => "company",
        }
    }
}

/// A buyer that passed validation, with empty strings removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidBuyer {
    /// The cleaned buyer object.
    pub buyer: Buyer,
    /// Its kind.
    pub kind: BuyerKind,
}

/// Why a buyer is not acceptable; the message names the field.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BuyerError {
    /// The tax code is malformed.
    #[error("buyer.taxCode: {0}")]
    TaxCode(#[from] tax_code::TaxCodeError),
    /// A member required with a tax code is missing.
    #[error("buyer.{0} is required with a tax code")]
    Required(&'static str),
    /// A member is longer than the invoice format allows.
    #[error("buyer.{field} is longer than {max} characters")]
    TooLong {
        /// Which member.
        field: &'static str,
        /// Its limit.
        max: usize,
    },
    /// A member carries a character an invoice cannot (a control character such as NUL).
    #[error("buyer.{field} {reason}")]
    Character {
        /// Which member.
        field: &'static str,
        /// Which character, by code point.
        reason: String,
    },
    /// Not an email address.
    #[error("buyer.email is not an email address")]
    Email,
    /// Not a phone number.
    #[error("buyer.phone is not a phone number (digits, spaces, +, -, . and parentheses)")]
    Phone,
}

fn clean(value: &Option<String>) -> Option<String> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned)
}

fn check_len(field: &'static str, value: &Option<String>, max: usize) -> Result<(), BuyerError> {
    match value {
        Some(v) if v.chars().count() > max => Err(BuyerError::TooLong { field, max }),
        Some(v) => match super::text::forbidden_char(v) {
            Some(c) => Err(BuyerError::Character { field, reason: super::text::forbidden_reason(c) }),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// A deliberately small check: one `@`, something before it, a dotted domain after it, no
/// whitespace. Deliverability is the mail server's business.
pub fn plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else { return false };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
}

impl Buyer {
    /// Validates and classifies the buyer.
    pub fn validate(&self) -> Result<ValidBuyer, BuyerError> {
        let buyer = Buyer {
            name: clean(&self.name),
            legal_name: clean(&self.legal_name),
            tax_code: clean(&self.tax_code),
            address: clean(&self.address),
            email: clean(&self.email),
            phone: clean(&self.phone),
        };
        // Lengths from the tax authority's XML format (DOMAIN §2): the buyer's person name is
        // `HVTNMHang` (100), the company's name `Ten` (400).
        check_len("name", &buyer.name, 100)?;
        check_len("legalName", &buyer.legal_name, 400)?;
        check_len("address", &buyer.address, 400)?;
        check_len("email", &buyer.email, 50)?;
        check_len("phone", &buyer.phone, 20)?;
        if let Some(email) = &buyer.email {
            if !plausible_email(email) {
                return Err(BuyerError::Email);
            }
        }
        if let Some(phone) = &buyer.phone {
            let ok = phone.chars().any(|c| c.is_ascii_digit())
                && phone.chars().all(|c| c.is_ascii_digit() || " +-.()".contains(c));
            if !ok {
                return Err(BuyerError::Phone);
            }
        }
        let kind = match &buyer.tax_code {
            None => BuyerKind::Consumer,
            Some(code) => {
                let parsed = tax_code::parse(code)?;
                if parsed.is_business() && buyer.legal_name.is_none() {
                    return Err(BuyerError::Required("legalName"));
                }
                if !parsed.is_business() && buyer.legal_name.is_none() && buyer.name.is_none() {
                    return Err(BuyerError::Required("name"));
                }
                if buyer.address.is_none() {
                    return Err(BuyerError::Required("address"));
                }
                match parsed {
                    TaxCode::PersonalId(_) => BuyerKind::Individual,
                    _ => BuyerKind::Company,
                }
            }
        };
        Ok(ValidBuyer { buyer, kind })
    }

    /// Validates the buyer of a payment. A payment is not a form its buyer can correct, and a
    /// paid order should get its invoice: contact details that fail (the email or the phone,
    /// and, without a tax code, any member) are dropped instead of refusing the payment, and
    /// their names returned. With a tax code, everything else a company invoice carries is
    /// checked as strictly as [`Buyer::validate`] does.
    pub fn validate_lenient(&self) -> Result<(ValidBuyer, Vec<&'static str>), BuyerError> {
        let has_tax_code = self.tax_code.as_deref().is_some_and(|t| !t.trim().is_empty());
        let mut buyer = self.clone();
        let mut dropped = Vec::new();
        loop {
            let error = match buyer.validate() {
                Ok(valid) => return Ok((valid, dropped)),
                Err(error) => error,
            };
            let field = match &error {
                BuyerError::Email => "email",
                BuyerError::Phone => "phone",
                BuyerError::TooLong { field, .. } | BuyerError::Character { field, .. } => field,
                _ => return Err(error),
            };
            let member = match field {
                "email" => &mut buyer.email,
                "phone" => &mut buyer.phone,
                "name" if !has_tax_code => &mut buyer.name,
                "legalName" if !has_tax_code => &mut buyer.legal_name,
                "address" if !has_tax_code => &mut buyer.address,
                _ => return Err(error),
            };
            if member.take().is_none() {
                return Err(error);
            }
            dropped.push(field);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn company() -> Buyer {
        Buyer {
            legal_name: Some("Công ty TNHH ABC".into()),
            tax_code: Some("0100109106".into()),
            address: Some("1 Tràng Tiền, Hà Nội".into()),
            ..Buyer::default()
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(Buyer::default().validate().unwrap().kind, BuyerKind::Consumer);
        assert_eq!(company().validate().unwrap().kind, BuyerKind::Company);
        let branch = Buyer { tax_code: Some("0100109106-001".into()), ..company() };
        assert_eq!(branch.validate().unwrap().kind, BuyerKind::Company);
        let person = Buyer {
            name: Some("Nguyễn Văn A".into()),
            tax_code: Some("001203004567".into()),
            address: Some("Hà Nội".into()),
            ..Buyer::default()
        };
        assert_eq!(person.validate().unwrap().kind, BuyerKind::Individual);
    }

    #[test]
    fn a_payments_buyer_loses_the_contact_details_that_fail_not_the_invoice() {
        let consumer = Buyer {
            name: Some("x".repeat(101)),
            email: Some("a@localhost".into()),
            phone: Some("028 3823 4567 ext 1".into()),
            ..Buyer::default()
        };
        let (valid, dropped) = consumer.validate_lenient().unwrap();
        assert_eq!(valid.kind, BuyerKind::Consumer);
        assert_eq!(valid.buyer, Buyer::default());
        assert_eq!(dropped.len(), 3, "{dropped:?}");
        // A company keeps what its invoice needs strict; only its email or phone may go.
        let bad_email = Buyer { email: Some("nope".into()), ..company() };
        let (valid, dropped) = bad_email.validate_lenient().unwrap();
        assert_eq!((valid.kind, valid.buyer.email, dropped), (BuyerKind::Company, None, vec!["email"]));
        let long_name = Buyer { legal_name: Some("x".repeat(401)), ..company() };
        assert!(matches!(long_name.validate_lenient(), Err(BuyerError::TooLong { field: "legalName", .. })));
        let bad_code = Buyer { tax_code: Some("0100109107".into()), ..company() };
        assert!(matches!(bad_code.validate_lenient(), Err(BuyerError::TaxCode(_))));
    }

    #[test]
    fn a_tax_code_needs_legal_name_and_address() {
        let no_name = Buyer { legal_name: None, ..company() };
        assert_eq!(no_name.validate(), Err(BuyerError::Required("legalName")));
        let no_address = Buyer { address: Some("   ".into()), ..company() };
        assert_eq!(no_address.validate(), Err(BuyerError::Required("address")));
    }

    #[test]
    fn bad_tax_codes_emails_and_phones_are_refused() {
        let bad = Buyer { tax_code: Some("0100109107".into()), ..company() };
        assert!(matches!(bad.validate(), Err(BuyerError::TaxCode(_))));
        assert!(bad.validate().unwrap_err().to_string().starts_with("buyer.taxCode: "));
        for email in ["a", "a@b", "@b.vn", "a b@c.vn", "a@.vn", "a@b.vn."] {
            let b = Buyer { email: Some(email.into()), ..Buyer::default() };
            assert_eq!(b.validate(), Err(BuyerError::Email), "{email}");
        }
        let b = Buyer { phone: Some("call me".into()), ..Buyer::default() };
        assert_eq!(b.validate(), Err(BuyerError::Phone));
        let b = Buyer {
            email: Some("a@example.vn".into()),
            phone: Some("+84 90 123 4567".into()),
            ..Buyer::default()
        };
        assert!(b.validate().is_ok());
    }

    #[test]
    fn empty_strings_count_as_absent() {
        let b = Buyer { name: Some(" ".into()), tax_code: Some("".into()), ..Buyer::default() };
        let valid = b.validate().unwrap();
        assert_eq!(valid.kind, BuyerKind::Consumer);
        assert_eq!(valid.buyer, Buyer::default());
    }

    #[test]
    fn overlong_fields_are_refused() {
        let b = Buyer { address: Some("x".repeat(401)), ..company() };
        assert_eq!(b.validate(), Err(BuyerError::TooLong { field: "address", max: 400 }));
        let b = Buyer { name: Some("x".repeat(101)), ..company() };
        assert_eq!(b.validate(), Err(BuyerError::TooLong { field: "name", max: 100 }));
        assert!(Buyer { name: Some("x".repeat(100)), ..company() }.validate().is_ok());
    }
}
