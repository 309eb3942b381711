//! What never leaves the agent in an inspection or a recording: the values of headers that carry
//! credentials (ACS's `Authorization` JWT, API keys, cookies, Event Grid's SAS keys, and any the
//! operator names) and every query parameter's value (a callback URL often carries a secret or a
//! call's context there). Names are kept, so a reader sees that a value was there.

/// Headers whose values are always replaced: request credentials (`Authorization`, which carries
/// ACS's signed JWT; `Proxy-Authorization`), session state (`Cookie`, `Set-Cookie`), and the API
/// keys of the platforms a bot commonly sits behind (Azure Functions, API Management, Event Grid
/// SAS delivery).
pub const DEFAULT_REDACTED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-functions-key",
    "ocp-apim-subscription-key",
    "aeg-sas-key",
    "aeg-sas-token",
];

/// What a redacted value is replaced with (plain URI characters, so a redacted query still
/// parses).
pub const REDACTED: &str = "REDACTED";

/// Replaces credentials and query values.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// Lower-case header names whose values are replaced.
    names: Vec<String>,
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new(std::iter::empty::<&str>())
    }
}

impl Redactor {
    /// The default headers and `extra` (any case).
    pub fn new<S: AsRef<str>>(extra: impl IntoIterator<Item = S>) -> Self {
        let mut names: Vec<String> = DEFAULT_REDACTED_HEADERS.iter().map(|n| (*n).to_owned()).collect();
        for name in extra {
            let name = name.as_ref().trim().to_ascii_lowercase();
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
        Self { names }
    }

    /// The header names whose values are replaced, lower case.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether `name`'s value is replaced.
    pub fn hides(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// Headers as text, redacted values replaced (values that are not UTF-8 are shown lossily).
    pub fn headers<'a>(&self, headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<(String, String)> {
        headers
            .into_iter()
            .map(|(name, value)| {
                let value =
                    if self.hides(name) { REDACTED.to_owned() } else { String::from_utf8_lossy(value).into_owned() };
                (name.to_ascii_lowercase(), value)
            })
            .collect()
    }

    /// A path and query with every query value replaced.
    pub fn path(&self, path_and_query: &str) -> String {
        let Some((path, query)) = path_and_query.split_once('?') else { return path_and_query.to_owned() };
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) => format!("{name}={REDACTED}"),
                None => pair.to_owned(),
            })
            .collect();
        format!("{path}?{}", redacted.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_named_headers_are_replaced_and_others_kept() {
        let redactor = Redactor::new(["X-Bot-Secret"]);
        let headers: Vec<(&str, &[u8])> = vec![
            ("Authorization", b"Bearer eyJ.secret"),
            ("x-bot-secret", b"s3cret"),
            ("content-type", b"application/json"),
            ("aeg-sas-key", b"k"),
        ];
        let shown = redactor.headers(headers);
        assert_eq!(
            shown,
            vec![
                ("authorization".to_owned(), REDACTED.to_owned()),
                ("x-bot-secret".to_owned(), REDACTED.to_owned()),
                ("content-type".to_owned(), "application/json".to_owned()),
                ("aeg-sas-key".to_owned(), REDACTED.to_owned()),
            ]
        );
        let text = format!("{shown:?}");
        assert!(!text.contains("s3cret") && !text.contains("eyJ"), "{text}");
    }

    #[test]
    fn every_query_value_is_replaced_and_names_kept() {
        let redactor = Redactor::default();
        assert_eq!(
            redactor.path("/api/callbacks?code=abc&callId=42&flag"),
            "/api/callbacks?code=REDACTED&callId=REDACTED&flag"
        );
        assert_eq!(redactor.path("/ws"), "/ws");
    }
}
