//! The hand-over extension of HBONE: moving a stream to a new `CONNECT`
//! without losing or doubling a byte, negotiated per stream.
//!
//! ```text
//!  client ztunnel                                      server ztunnel
//!  CONNECT 10.244.2.3:8080  kanava-handover: v1   ──►
//!                          ◄──  200  kanava-handover: <token>     (granted)
//!  ... DATA both ways ...
//!  (either side leaves: stops reading its app, sends what it read)
//!  trailers  kanava-moving: <bytes sent>           ──►
//!                          ◄──  trailers  kanava-moving: <bytes sent>
//!  (both have written to their apps all they received; the kernel keeps
//!   what neither read. The server side parks its app socket under the token;
//!   whichever process now holds the client's app socket asks again:)
//!  CONNECT 10.244.2.3:8080  kanava-resume: <token>
//!                           kanava-handover: v1    ──►
//!                          ◄──  200  kanava-handover: <new token>
//!  ... DATA both ways, on the new stream ...
//! ```
//!
//! A peer that does not know the headers (Istio's ztunnel, an older Kanava)
//! ignores the offer and answers 200 without a token: that stream is never
//! moved, and a leaving ztunnel drains it instead, as before. Everything
//! else of the wire format is unchanged.
//!
//! A token is 128 random bits issued by the server side, usable once, only
//! while its stream is parked (for [`PARK_TTL`] at most), and only by the
//! identity it was issued to, for the pod and target it was issued for:
//! knowing it lets nobody else take the connection over.
//!
//! Either side may end its direction with the `kanava-moving` trailer
//! instead of a plain END_STREAM; a direction that had already ended plainly
//! (its app half-closed) stays ended on the new stream. The byte count lets
//! the receiver check that it has everything the sender sent.

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

/// Offer (request, `v1`) and grant (200 response, a token).
pub const HANDOVER_HEADER: &str = "kanava-handover";
/// The one version of the extension this build speaks.
pub const HANDOVER_OFFER: &str = "v1";
/// On a `CONNECT`: the token of the parked stream this one continues.
pub const RESUME_HEADER: &str = "kanava-resume";
/// Trailer ending a direction because the stream is moving: bytes the
/// sender sent on the stream, in decimal.
pub const MOVING_TRAILER: &str = "kanava-moving";

/// How long a parked stream waits for its client to come back.
pub const PARK_TTL: Duration = Duration::from_secs(30);

/// A resume token: 128 random bits, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token([u8; 16]);

impl Token {
    /// A fresh token from the operating system's random source.
    pub fn random() -> Token {
        Token(rand::random())
    }

    /// Reads 32 hex digits (either case); nothing else is a token.
    pub fn parse(text: &[u8]) -> Option<Token> {
        if text.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            let high = hex_digit(pair[0])?;
            let low = hex_digit(pair[1])?;
            *byte = (high << 4) | low;
        }
        Some(Token(bytes))
    }

    pub fn header_value(&self) -> HeaderValue {
        // 32 hex digits are always a valid header value.
        HeaderValue::from_str(&self.to_string()).unwrap_or(HeaderValue::from_static("-"))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Tokens stay out of logs whole: the first 8 digits name one well enough.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.to_string();
        write!(f, "{}…", &text[..8])
    }
}

/// What a `CONNECT` request says of the extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestExtension {
    /// The client can move this stream (it offered `v1`).
    pub offered: bool,
    /// The parked stream it continues, if it resumes one.
    pub resume: Option<Token>,
}

/// Why a request's or a trailer's extension headers are not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtensionError {
    #[error("{RESUME_HEADER} is not a token of 32 hex digits")]
    BadToken,
    #[error("{RESUME_HEADER} without {HANDOVER_HEADER}: {HANDOVER_OFFER}")]
    ResumeWithoutOffer,
    #[error("{MOVING_TRAILER} is not a byte count")]
    BadCount,
    #[error("{name} appears more than once")]
    Repeated { name: &'static str },
}

/// Reads the extension's request headers. An offer of a version this build
/// does not speak is no offer (a later version falls back to this one's
/// behaviour: no move); a malformed resume is an error (answered 400).
pub fn read_request(headers: &HeaderMap) -> Result<RequestExtension, ExtensionError> {
    let offered = single(headers, HANDOVER_HEADER)?
        .is_some_and(|value| value.as_bytes() == HANDOVER_OFFER.as_bytes());
    let resume = match single(headers, RESUME_HEADER)? {
        None => None,
        Some(value) => Some(Token::parse(value.as_bytes()).ok_or(ExtensionError::BadToken)?),
    };
    if resume.is_some() && !offered {
        return Err(ExtensionError::ResumeWithoutOffer);
    }
    Ok(RequestExtension { offered, resume })
}

/// The token a 200 response granted, if it granted one. A response whose
/// grant is not a token grants nothing: the stream is drained, never moved.
pub fn read_grant(headers: &HeaderMap) -> Option<Token> {
    let mut values = headers.get_all(HANDOVER_HEADER).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    Token::parse(value.as_bytes())
}

/// The headers a client adds to a `CONNECT`.
pub fn offer(headers: &mut HeaderMap, resume: Option<Token>) {
    headers.insert(HANDOVER_HEADER, HeaderValue::from_static(HANDOVER_OFFER));
    if let Some(token) = resume {
        headers.insert(RESUME_HEADER, token.header_value());
    }
}

/// The header a server adds to a 200 to grant a token.
pub fn grant(headers: &mut HeaderMap, token: Token) {
    headers.insert(HANDOVER_HEADER, token.header_value());
}

/// The trailers that end a direction because the stream moves.
pub fn moving_trailers(sent: u64) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert(MOVING_TRAILER, HeaderValue::from(sent));
    trailers
}

/// Reads the trailers that ended a direction: `None` when they do not say
/// the stream moves (a plain end), else the byte count the sender sent.
pub fn read_moving(trailers: Option<&HeaderMap>) -> Option<Result<u64, ExtensionError>> {
    let trailers = trailers?;
    match single(trailers, MOVING_TRAILER) {
        Err(error) => Some(Err(error)),
        Ok(None) => None,
        Ok(Some(value)) => Some(parse_count(value.as_bytes()).ok_or(ExtensionError::BadCount)),
    }
}

fn parse_count(text: &[u8]) -> Option<u64> {
    // Plain decimal digits only: no sign, no spaces, no leading `+`.
    if text.is_empty() || text.len() > 20 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

fn single<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<Option<&'a HeaderValue>, ExtensionError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ExtensionError::Repeated { name });
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_read_back_as_themselves_and_nothing_else_is_one() {
        let token = Token::random();
        assert_eq!(Token::parse(token.to_string().as_bytes()), Some(token));
        assert_eq!(
            Token::parse(token.to_string().to_uppercase().as_bytes()),
            Some(token)
        );
        assert_ne!(Token::random(), token, "random, not a counter");
        for bad in [
            &b""[..],
            b"00",
            b"0123456789abcdef0123456789abcdeg",
            b"0123456789abcdef0123456789abcdef0",
            b" 123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(Token::parse(bad), None, "{bad:?}");
        }
        assert!(!format!("{token:?}").contains(&token.to_string()));
    }

    #[test]
    fn requests_offer_and_resume() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            read_request(&headers),
            Ok(RequestExtension {
                offered: false,
                resume: None
            })
        );
        let token = Token::random();
        offer(&mut headers, Some(token));
        assert_eq!(
            read_request(&headers),
            Ok(RequestExtension {
                offered: true,
                resume: Some(token)
            })
        );
        headers.insert(HANDOVER_HEADER, HeaderValue::from_static("v2"));
        assert_eq!(
            read_request(&headers),
            Err(ExtensionError::ResumeWithoutOffer),
            "a version this build does not speak is no offer"
        );
        headers.insert(HANDOVER_HEADER, HeaderValue::from_static("v1"));
        headers.insert(RESUME_HEADER, HeaderValue::from_static("nope"));
        assert_eq!(read_request(&headers), Err(ExtensionError::BadToken));
        headers.append(RESUME_HEADER, token.header_value());
        assert!(matches!(
            read_request(&headers),
            Err(ExtensionError::Repeated { .. })
        ));
    }

    #[test]
    fn grants_are_one_token_or_nothing() {
        let mut headers = HeaderMap::new();
        assert_eq!(read_grant(&headers), None, "a peer without the extension");
        let token = Token::random();
        grant(&mut headers, token);
        assert_eq!(read_grant(&headers), Some(token));
        headers.append(HANDOVER_HEADER, Token::random().header_value());
        assert_eq!(read_grant(&headers), None, "two grants are none");
        headers.insert(HANDOVER_HEADER, HeaderValue::from_static("v1"));
        assert_eq!(read_grant(&headers), None);
    }

    #[test]
    fn moving_trailers_carry_the_byte_count() {
        assert_eq!(read_moving(None), None, "a plain END_STREAM");
        assert_eq!(read_moving(Some(&HeaderMap::new())), None);
        assert_eq!(read_moving(Some(&moving_trailers(0))), Some(Ok(0)));
        assert_eq!(
            read_moving(Some(&moving_trailers(u64::MAX))),
            Some(Ok(u64::MAX))
        );
        for bad in ["", "-1", "+1", "1 ", "18446744073709551616", "0x10"] {
            let mut trailers = HeaderMap::new();
            trailers.insert(MOVING_TRAILER, HeaderValue::from_str(bad).expect("value"));
            assert_eq!(
                read_moving(Some(&trailers)),
                Some(Err(ExtensionError::BadCount)),
                "{bad:?}"
            );
        }
    }
}
