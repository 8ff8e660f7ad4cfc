//! Statement text for the audit trail: literal values removed, comments
//! dropped, so a record shows what was asked without the PHI it was asked
//! about (`WHERE mrn = '12345'` becomes `WHERE mrn = ?`).
//!
//! The text is cut into tokens by sqlparser's PostgreSQL tokenizer and only
//! tokens known to carry no value are kept: keywords and identifiers,
//! placeholders (`$1`), plain white space and punctuation. Everything else —
//! every kind of string, number, bit string, dollar-quoted body, and any
//! token the tokenizer may add in a later version — becomes `?`. Text that
//! does not tokenize (an unterminated quote) is not recorded at all.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

/// Longest statement text kept in a record (characters).
pub const MAX_STATEMENT_CHARS: usize = 4096;

/// A statement as the audit trail shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The text with literals replaced by `?`.
    pub text: String,
    /// Whether any statement in the text is a `COPY`.
    pub copy: bool,
}

/// Normalizes `sql` for the record.
pub fn normalize(sql: &str) -> Normalized {
    let tokens = match Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() {
        Ok(tokens) => tokens,
        Err(_) => {
            return Normalized { text: format!("<untokenizable statement of {} bytes>", sql.len()), copy: false };
        }
    };
    let mut text = String::with_capacity(sql.len().min(MAX_STATEMENT_CHARS));
    let mut copy = false;
    let mut statement_start = true;
    let mut after_number = false;
    for token in &tokens {
        // Letters and digits right after a number are the number's:
        // PostgreSQL 16 reads `0o17`, `0b101` and `1_000` as one literal
        // (15 refuses them, 14 took `0o17` as 0 named o17), and the
        // tokenizer here cuts them into a number and a word.
        let glued_to_number = after_number && matches!(token, Token::Word(w) if w.quote_style.is_none());
        after_number = matches!(token, Token::Number(..)) || glued_to_number;
        if glued_to_number {
            continue;
        }
        let piece = match token {
            Token::Whitespace(Whitespace::Space | Whitespace::Tab | Whitespace::Newline) => " ".to_string(),
            // Comments are free text: dropped.
            Token::Whitespace(_) => " ".to_string(),
            Token::Word(word) => {
                if statement_start && word.quote_style.is_none() && word.keyword == Keyword::COPY {
                    copy = true;
                }
                statement_start = false;
                // A quoted identifier is free text (`AS "Joe Doe"`): kept
                // only when it looks like a name.
                let name_like = word.value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
                if word.quote_style.is_some() && !name_like { "\"?\"".to_string() } else { token.to_string() }
            }
            Token::Placeholder(p) if p.starts_with('$') && p[1..].bytes().all(|b| b.is_ascii_digit()) => {
                statement_start = false;
                token.to_string()
            }
            Token::SemiColon => {
                statement_start = true;
                ";".to_string()
            }
            Token::LParen => "(".to_string(),
            Token::EOF => String::new(),
            other => {
                statement_start = false;
                let shown = other.to_string();
                if is_punctuation(&shown) { shown } else { "?".to_string() }
            }
        };
        push_collapsed(&mut text, &piece);
    }
    let text = text.trim().to_string();
    let text = if text.chars().count() > MAX_STATEMENT_CHARS {
        let mut cut: String = text.chars().take(MAX_STATEMENT_CHARS).collect();
        cut.push('…');
        cut
    } else {
        text
    };
    Normalized { text, copy }
}

/// Operators and brackets: short, and made of nothing a value is made of.
fn is_punctuation(shown: &str) -> bool {
    !shown.is_empty()
        && shown.chars().count() <= 3
        && shown.chars().all(|c| c.is_ascii_punctuation() && !matches!(c, '\'' | '"' | '$' | '`' | '\\'))
}

/// Appends, keeping at most one space in a row.
fn push_collapsed(text: &mut String, piece: &str) {
    if piece == " " {
        if !text.is_empty() && !text.ends_with(' ') {
            text.push(' ');
        }
    } else {
        text.push_str(piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn literals_become_placeholders() {
        let n = normalize("SELECT name, dob FROM clinic.patients WHERE mrn = '12345' AND age > 42");
        assert_eq!(n.text, "SELECT name, dob FROM clinic.patients WHERE mrn = ? AND age > ?");
        assert!(!n.copy);
    }

    #[test]
    fn every_string_form_is_removed() {
        for sql in [
            "SELECT E'Joe\\'s Doe'",
            "SELECT $$Joe Doe$$",
            "SELECT $tag$Joe Doe$tag$",
            "SELECT U&'Joe Doe'",
            "SELECT B'1010'",
            "SELECT X'4a6f65'",
            "SELECT N'Joe Doe'",
            "SELECT 'Joe' 'Doe'",
            "SELECT 1.5e3",
            "SELECT 'Joe Doe'::text",
        ] {
            let n = normalize(sql);
            for secret in ["Joe", "Doe", "1010", "4a6f65", "1.5", "e3"] {
                assert!(!n.text.contains(secret), "{sql} -> {}", n.text);
            }
            assert!(n.text.starts_with("SELECT ?"), "{sql} -> {}", n.text);
        }
    }

    #[test]
    fn what_is_glued_to_a_number_goes_with_it() {
        // PostgreSQL 16's integer forms, and 14's number-then-alias.
        for sql in
            ["SELECT 0o7331", "SELECT 0b1011", "SELECT 0x7331", "SELECT 7_331", "SELECT 7331abc", "SELECT 1.5e3x7331"]
        {
            let n = normalize(sql);
            assert_eq!(n.text, "SELECT ?", "{sql}");
        }
        assert_eq!(normalize("SELECT 1 AS o7331").text, "SELECT ? AS o7331");
    }

    #[test]
    fn comments_are_dropped_and_identifiers_kept() {
        let n = normalize("SELECT \"Name\" /* patient Joe Doe */ FROM t -- MRN 12345\nWHERE id = $1");
        assert_eq!(n.text, "SELECT \"Name\" FROM t WHERE id = $1");
    }

    #[test]
    fn quoted_identifiers_that_are_not_names_are_removed() {
        let n = normalize("SELECT name AS \"Joe Doe, MRN 12345\" FROM \"Clinical\".patients");
        assert_eq!(n.text, "SELECT name AS \"?\" FROM \"Clinical\".patients");
    }

    #[test]
    fn copy_is_found_at_any_statement_start() {
        assert!(normalize("COPY clinic.patients TO STDOUT").copy);
        assert!(normalize("select 1; copy (select name from t) to stdout").copy);
        assert!(normalize("  /* x */ COPY t FROM STDIN").copy);
        assert!(!normalize("SELECT copy FROM t").copy);
        assert!(!normalize("SELECT \"copy\" FROM t").copy);
    }

    #[test]
    fn unterminated_text_is_not_recorded() {
        let n = normalize("SELECT 'Joe Doe");
        assert_eq!(n.text, "<untokenizable statement of 15 bytes>");
    }

    #[test]
    fn long_statements_are_cut() {
        let sql = format!("SELECT {}", vec!["a"; 5000].join(", "));
        let n = normalize(&sql);
        assert_eq!(n.text.chars().count(), MAX_STATEMENT_CHARS + 1);
        assert!(n.text.ends_with('…'));
    }

    proptest! {
        /// Whatever value is embedded as a literal, it never reaches the text.
        #[test]
        fn no_literal_survives(value in "[A-Za-z0-9 ]{4,24}", quote in 0usize..4) {
            prop_assume!(value.trim().len() >= 4);
            let literal = match quote {
                0 => format!("'{value}'"),
                1 => format!("E'{value}'"),
                2 => format!("$q${value}$q$"),
                _ => format!("$${value}$$"),
            };
            let n = normalize(&format!("SELECT id FROM clinic.patients WHERE note = {literal}"));
            prop_assert_eq!(n.text, "SELECT id FROM clinic.patients WHERE note = ?");
        }
    }
}
